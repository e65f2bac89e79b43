//! The live view of a desktop sandbox as the API describes it: a request for a viewer link
//! ([`DesktopViewRequest`]) and the link ([`DesktopViewResponse`]). Must not: know how the
//! daemon serves the link or relays the screen (that is `kilnd`'s `view` module).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// How long a viewer link stays valid by default (24 hours); it ends earlier when its
/// sandbox is removed.
pub const DEFAULT_VIEW_TTL_SECS: u64 = 24 * 60 * 60;

/// `POST /v1/sandboxes/{id}/desktop/view`: a link for a browser to watch (or control) the
/// sandbox's screen. An empty body is `{"control": false}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DesktopViewRequest {
    /// Let the viewer send keyboard, mouse and clipboard input to the guest (default: view
    /// only; the daemon drops every input message of a view-only viewer).
    #[serde(default)]
    pub control: bool,
}

/// A viewer link: a capability, anyone who has it can watch (or control) the screen until
/// it expires or the sandbox is removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DesktopViewResponse {
    /// The page to open in a browser on the daemon's host (noVNC, connecting by itself and
    /// scaling the screen to the window), e.g.
    /// `http://127.0.0.1:PORT/view/<token>/vnc.html?autoconnect=1&...`.
    pub url: String,
    /// Whether the link grants control (input) or only viewing.
    pub control: bool,
    /// When the link stops working, in milliseconds since the Unix epoch.
    pub expires_at_unix_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desktop_view_request_defaults_to_view_only_and_refuses_unknown_fields() {
        let r: DesktopViewRequest = serde_json::from_str("{}").unwrap();
        assert!(!r.control);
        let r: DesktopViewRequest = serde_json::from_str(r#"{"control": true}"#).unwrap();
        assert!(r.control);
        assert!(serde_json::from_str::<DesktopViewRequest>(r#"{"contrl": true}"#).is_err());
    }
}
