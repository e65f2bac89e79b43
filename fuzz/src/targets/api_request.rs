//! Fuzz target `api_request`: arbitrary bytes as the JSON body of an API request, decoded into
//! the request type the daemon decodes for that route (`kiln-api-types`).
//!
//! Checks, for every input:
//! - decoding never panics, whatever the nesting, numbers or strings;
//! - `validate` (where the type has one) never panics;
//! - a body that decodes re-encodes, decodes back to an equal value, and that value validates
//!   exactly as the first did (so what the daemon checks is what it stores and forwards).
//!
//! Input layout: byte 0 (mod the number of types) picks the request type; the rest is the body.
//! The whole-route fuzz over HTTP is `bins/kilnd/src/api_fuzz.rs`; this one is libFuzzer's
//! coverage-guided view of the bodies alone.

use std::fmt::Debug;

use kiln_api_types::{
    ExecKillRequest, ExecRequest, FileMkdirRequest, FileRenameRequest, ImageBuildRecipeRequest,
    ImageBuildRequest, ImageImportRequest, JobRequest, NetworkUpdate, PoolSetRequest, PruneRequest,
    RunRequest, SandboxSpec, SandboxStartRequest, SecretsUpdateRequest, SnapshotCreateRequest,
    TtlRequest,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Decodes, validates, round-trips. `validate` returns the error text, if any.
fn check<T>(body: &[u8], validate: fn(&T) -> Option<String>)
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    let Ok(value) = serde_json::from_slice::<T>(body) else {
        return;
    };
    let verdict = validate(&value);
    let json =
        serde_json::to_vec(&value).unwrap_or_else(|e| panic!("decoded {value:?} must encode: {e}"));
    let again: T = serde_json::from_slice(&json).unwrap_or_else(|e| {
        panic!(
            "re-encoded {value:?} must decode: {e}; json {}",
            String::from_utf8_lossy(&json)
        )
    });
    assert_eq!(again, value, "a request must survive re-encoding");
    assert_eq!(
        validate(&again),
        verdict,
        "validation must not change across re-encoding"
    );
}

fn none<T>(_: &T) -> Option<String> {
    None
}

/// Checks one input (see the module docs); panics on a finding.
pub fn run(data: &[u8]) {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    match pick % 17 {
        0 => check::<SandboxSpec>(body, |v| v.validate().err().map(|e| e.to_string())),
        1 => check::<ExecRequest>(body, |v| v.validate().err()),
        2 => check::<RunRequest>(body, |v| {
            v.sandbox
                .validate()
                .err()
                .map(|e| e.to_string())
                .or_else(|| v.exec.validate().err())
        }),
        3 => check::<SnapshotCreateRequest>(body, none),
        4 => check::<SecretsUpdateRequest>(body, |v| v.secrets.validate().err()),
        5 => check::<SandboxStartRequest>(body, none),
        6 => check::<TtlRequest>(body, none),
        7 => check::<ExecKillRequest>(body, none),
        8 => check::<FileMkdirRequest>(body, none),
        9 => check::<FileRenameRequest>(body, none),
        10 => check::<ImageBuildRequest>(body, none),
        11 => check::<ImageBuildRecipeRequest>(body, none),
        12 => check::<ImageImportRequest>(body, none),
        13 => check::<PruneRequest>(body, none),
        14 => check::<NetworkUpdate>(body, none),
        15 => check::<PoolSetRequest>(body, |v| v.validate().err().map(|e| e.to_string())),
        _ => check::<JobRequest>(body, |v| v.validate().err().map(|e| e.to_string())),
    }
}
