//! OpenAPI schemas that `#[derive(ToSchema)]` cannot express: identifiers that are strings on
//! the wire with a validated pattern.
//!
//! Must agree with the types' `FromStr` (a test checks a generated id against the pattern).

use std::borrow::Cow;

use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::{PartialSchema, ToSchema};

use crate::SandboxId;

/// The pattern a [`SandboxId`] matches.
pub const SANDBOX_ID_PATTERN: &str = "^sb-[0-9a-f]{12}$";

impl PartialSchema for SandboxId {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(SANDBOX_ID_PATTERN))
            .description(Some(
                "Identifier of a sandbox: `sb-` and 12 lowercase hex digits.",
            ))
            .examples([serde_json::json!("sb-0123456789ab")])
            .into()
    }
}

impl ToSchema for SandboxId {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("SandboxId")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_id_schema_pattern_matches_random_id_shape() {
        let id = SandboxId::random();
        let hex = id.as_str().strip_prefix("sb-").unwrap();
        // The pattern is written by hand: check its pieces against what FromStr accepts.
        assert!(SANDBOX_ID_PATTERN.starts_with("^sb-"));
        assert!(SANDBOX_ID_PATTERN.contains(&format!("{{{}}}", hex.len())));
        let json = serde_json::to_value(SandboxId::schema()).unwrap();
        assert_eq!(json["pattern"], SANDBOX_ID_PATTERN);
        assert_eq!(json["type"], "string");
    }
}
