//! Bearer-token authentication of the TCP listener.
//!
//! The unix socket needs no token (its mode 0600 is the access control); every request on
//! the TCP listener must carry `Authorization: Bearer <token>` with the token of
//! `$KILN_HOME/token`, or it is answered 401 with an `ApiError` of code `unauthorized` before
//! any handler runs. The file is read on every request, so `kiln token --rotate` takes effect
//! at once without a restart; it is 65 bytes, so reading it inline costs microseconds.
//!
//! Invariant: the comparison takes the same time wherever the tokens differ. Both tokens are
//! hashed with SHA-256 first (so their lengths are equal too) and the digests compared with
//! `subtle`'s constant-time equality.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kiln_api_types::{ApiError, ErrorCode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::warn;

/// Where the expected token lives.
#[derive(Debug, Clone)]
pub struct TokenFile(pub Arc<PathBuf>);

/// Middleware: lets a request through only with the right bearer token.
pub async fn require_token(State(file): State<TokenFile>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let expected = match kiln_client::token::read(&file.0) {
        Ok(t) => t,
        Err(e) => {
            warn!(error = %kiln_client::error_chain(&e), "cannot read the API token");
            None
        }
    };
    match (presented, expected) {
        (Some(p), Some(e)) if tokens_equal(p, &e) => next.run(req).await,
        (None, _) => unauthorized(
            "missing `Authorization: Bearer <token>` header (the token is in $KILN_HOME/token; see `kiln token`)",
        ),
        _ => unauthorized("wrong API token (see `kiln token`)"),
    }
}

fn unauthorized(message: &str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
        axum::Json(ApiError {
            code: ErrorCode::Unauthorized.as_str().to_owned(),
            message: message.to_owned(),
        }),
    )
        .into_response()
}

/// Constant-time equality of two tokens (see the module docs).
fn tokens_equal(a: &str, b: &str) -> bool {
    let (ha, hb) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    ha.ct_eq(&hb).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_equal_only_for_identical_tokens() {
        assert!(tokens_equal("abc", "abc"));
        assert!(!tokens_equal("abc", "abd"));
        assert!(!tokens_equal("abc", "abcd"));
        assert!(!tokens_equal("", "abc"));
    }
}
