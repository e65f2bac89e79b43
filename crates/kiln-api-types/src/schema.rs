//! OpenAPI schemas that `#[derive(ToSchema)]` cannot express: identifiers that are strings on
//! the wire with a validated pattern.
//!
//! Must agree with the types' `FromStr` (a test checks a generated id against the pattern).

use std::borrow::Cow;

use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::{PartialSchema, ToSchema};

use crate::SandboxId;
use crate::names::{ImageName, LabelKey, Labels, SandboxName, SnapshotName};

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

/// A string schema with a pattern, a description and an example.
fn pattern_string(pattern: &str, description: &str, example: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(pattern))
        .description(Some(description))
        .examples([serde_json::json!(example)])
        .into()
}

macro_rules! named_string_schema {
    ($ty:ty, $name:literal, $pattern:expr, $description:literal, $example:literal) => {
        impl PartialSchema for $ty {
            fn schema() -> RefOr<Schema> {
                pattern_string($pattern, $description, $example)
            }
        }

        impl ToSchema for $ty {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }
        }
    };
}

named_string_schema!(
    crate::network::NetworkGroup,
    "NetworkGroup",
    "^[a-z0-9][a-z0-9_-]{0,31}$",
    "A bridge network group: sandboxes sharing one reach each other.",
    "web"
);
named_string_schema!(
    crate::network::NetRule,
    "NetRule",
    "^[^,]+$",
    "An egress rule: a domain (`example.org`, `*.example.org`) or an IPv4 network (`10.1.2.0/24`, `10.1.2.3`), each with an optional `:PORT`.",
    "*.example.org:443"
);
named_string_schema!(
    ImageName,
    "ImageName",
    "^[a-z0-9][a-z0-9_-]{0,63}$",
    "An image name (a recipe name such as `python`).",
    "python"
);
named_string_schema!(
    SnapshotName,
    "SnapshotName",
    "^[a-z0-9][a-z0-9._-]{0,63}$|^warm-[a-z0-9][a-z0-9._-]{0,122}$",
    "A snapshot name; `warm-…` names are kiln's own warm snapshots and cannot be created.",
    "db-seeded"
);
named_string_schema!(
    SandboxName,
    "SandboxName",
    "^(?!sb-)[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
    "A sandbox's unique name, usable wherever its id is; cannot start with `sb-`.",
    "web-1"
);
named_string_schema!(
    LabelKey,
    "LabelKey",
    "^[a-z0-9][a-z0-9._/-]{0,62}$",
    "A label key.",
    "team"
);

impl PartialSchema for Labels {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .property_names(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some("^[a-z0-9][a-z0-9._/-]{0,62}$")),
            ))
            .additional_properties(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .max_length(Some(crate::names::MAX_LABEL_VALUE)),
            ))
            .max_properties(Some(crate::names::MAX_LABELS))
            .description(Some("Labels by key (at most 64; values up to 256 bytes)."))
            .examples([serde_json::json!({"team": "ml"})])
            .into()
    }
}

impl ToSchema for Labels {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Labels")
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

    #[test]
    fn name_schemas_accept_what_from_str_accepts() {
        // The patterns are hand-written: spot-check that valid names fit their shape.
        let image = serde_json::to_value(ImageName::schema()).unwrap();
        assert_eq!(image["type"], "string");
        assert!(image["pattern"].as_str().unwrap().contains("{0,63}"));
        let labels = serde_json::to_value(Labels::schema()).unwrap();
        assert_eq!(labels["maxProperties"], crate::names::MAX_LABELS);
    }
}
named_string_schema!(
    crate::desktop::Screen,
    "Screen",
    "^[0-9]{3,4}x[0-9]{3,4}$",
    "A desktop sandbox's screen size, `WIDTHxHEIGHT` in pixels (640x480 to 2560x1600, the width a multiple of 8).",
    "1280x800"
);
