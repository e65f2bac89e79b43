//! A seeded property-based fuzz of every route of the OpenAPI document, against the real
//! edge ([`crate::listen::serve`] on the unix socket and, for a quarter of the requests, on
//! the TCP listener with its bearer token) and router, with a test engine on a temp home.
//!
//! Each round picks an operation of the document and builds one request from it: valid or
//! mutated JSON bodies generated from the operation's request schema (non-object JSON, wrong
//! types, unknown fields, huge numbers, deep nesting, truncation, bytes that are not UTF-8,
//! oversize bodies), random and hostile path and query parameters (percent escapes, `..`, NUL,
//! bytes that do not decode to UTF-8, very long values), wrong methods, and missing, extra or
//! contradictory headers (chunked bodies, `expect`, a body shorter than its
//! `content-length`). Every answer must hold the API's promises:
//! - no 5xx;
//! - every error body parses as an `ApiError` whose `code` is an `ErrorCode`;
//! - the status is one the document lists for the operation the request reached (or a 405
//!   for a method the path lacks, a 404 `not_found` for a path no route has, and the edge's
//!   408/413/414).
//!
//! Invariant: no request can start a VM or an image build. The temp home has no image (so
//! `sandbox_create` ends in `image_not_found`, `snapshot_not_found` or a 400), no sandbox and
//! no detached command; the path of `image_build` never decodes to a built-in recipe's name
//! (and a 200 from it fails the test); `doctor_get` (which runs QEMU to probe it) is only
//! sent with a method it does not serve. `system_prune` runs for real: the temp home holds
//! nothing it could remove.
//!
//! `KILN_FUZZ_SEED` replays a run (the seed is printed first), `KILN_FUZZ_ROUNDS` sets the
//! number of requests. The last line printed is the summary the issue quotes:
//! `api fuzz: N requests, M bad inputs, 0 5xx, 0 off-schema`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Settings;

/// Requests of a default run (about 6 s in a debug build on an idle 2-core machine).
const DEFAULT_ROUNDS: u64 = 10_000;
/// A request not answered within this has hung: a failure, not a speed bound.
const ANSWER_DEADLINE: Duration = Duration::from_secs(60);
/// The fuzz daemon's limits: small, so that 413 and 408 are cheap to reach.
const MAX_BODY_BYTES: u64 = 64 << 10;
const BODY_TIMEOUT: Duration = Duration::from_secs(1);

/// One operation of the document.
struct Op {
    method: String,
    path: String,
    id: String,
    /// (name, in, required, schema)
    params: Vec<(String, String, bool, Value)>,
    body: Option<(String, Value)>,
    statuses: BTreeSet<u16>,
}

fn operations(doc: &Value) -> Vec<Op> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("a path item") {
            let params = op["parameters"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .map(|p| {
                            (
                                p["name"].as_str().unwrap_or_default().to_owned(),
                                p["in"].as_str().unwrap_or_default().to_owned(),
                                p["required"].as_bool().unwrap_or(false),
                                p["schema"].clone(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let body = op["requestBody"]["content"].as_object().and_then(|c| {
                c.iter()
                    .next()
                    .map(|(ct, v)| (ct.clone(), v["schema"].clone()))
            });
            let statuses = op["responses"]
                .as_object()
                .expect("responses")
                .keys()
                .filter_map(|s| s.parse().ok())
                .collect();
            ops.push(Op {
                method: method.to_uppercase(),
                path: path.clone(),
                id: op["operationId"].as_str().unwrap_or_default().to_owned(),
                params,
                body,
                statuses,
            });
        }
    }
    ops
}

/// One request as sent.
#[derive(Debug, Clone)]
struct Req {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Declare more body than is sent (the edge's body deadline must answer).
    short_body: bool,
    /// Send the body chunked instead of with a `content-length`.
    chunked: bool,
    /// Something in it is deliberately wrong.
    bad: bool,
}

impl Req {
    fn bytes(&self) -> Vec<u8> {
        let mut out =
            format!("{} {} HTTP/1.1\r\nhost: kiln\r\n", self.method, self.target).into_bytes();
        if !self.headers.iter().any(|(k, _)| k == "connection") {
            out.extend(b"connection: close\r\n");
        }
        for (k, v) in &self.headers {
            out.extend(format!("{k}: {v}\r\n").as_bytes());
        }
        if self.chunked {
            out.extend(b"transfer-encoding: chunked\r\n\r\n");
            for piece in self.body.chunks(1000) {
                out.extend(format!("{:x}\r\n", piece.len()).as_bytes());
                out.extend(piece);
                out.extend(b"\r\n");
            }
            out.extend(b"0\r\n\r\n");
        } else {
            let declared = self.body.len() + if self.short_body { 100 } else { 0 };
            out.extend(format!("content-length: {declared}\r\n\r\n").as_bytes());
            out.extend(&self.body);
        }
        out
    }

    fn describe(&self) -> String {
        let target: String = self.target.chars().take(200).collect();
        let body = String::from_utf8_lossy(&self.body[..self.body.len().min(200)]).into_owned();
        format!(
            "{} {target} headers={:?} body({} bytes)={body:?} short={} chunked={}",
            self.method,
            self.headers,
            self.body.len(),
            self.short_body,
            self.chunked
        )
    }
}

/// Characters a path segment may hold unescaped (RFC 3986 `pchar` without `%`).
const PCHAR: &[u8] =
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@";

fn encode(raw: &[u8]) -> String {
    let mut out = String::new();
    for &b in raw {
        if PCHAR.contains(&b) && b != b'&' && b != b'=' && b != b'+' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// A path or query value: plausible, or hostile.
fn param_value(rng: &mut StdRng, name: &str, bad: &mut bool) -> String {
    let plausible: &[&str] = match name {
        "id" => &["sb-0123456789ab", "web-1", "sb-", "0123", "db"],
        "exec_id" => &["ex-0123456789ab", "ex-", "ex-zzzzzzzzzzzz"],
        "name" => &["nosuch", "db-seeded", "warm-abc", "x"],
        "path" => &["/tmp/x", "/", "/root/a b", "relative"],
        "mode" => &["0644", "755", "0o755", "9999"],
        "tar" | "follow" | "recursive" => &["true", "false", "1", "yes"],
        "after" => &["a", ""],
        "label" => &["team=ml", "team", "=x", "A=B"],
        "status" => &["running", "paused", "nope"],
        _ => &["x"],
    };
    if rng.random_bool(0.5) {
        return encode(plausible.choose(rng).expect("non-empty").as_bytes());
    }
    *bad = true;
    match rng.random_range(0..12) {
        0 => "..".to_owned(),
        1 => "%2e%2e".to_owned(),
        2 => "..%2F..%2Fetc%2Fpasswd".to_owned(),
        3 => "a%00b".to_owned(),
        4 => "%ff%fe".to_owned(),
        5 => "%c3%28".to_owned(),
        6 => "%".to_owned(),
        7 => "%zz".to_owned(),
        8 => "x".repeat(rng.random_range(200..10_000)),
        9 => encode("é✓\u{202e}".as_bytes()),
        10 => {
            let raw: Vec<u8> = (0..rng.random_range(1..40)).map(|_| rng.random()).collect();
            encode(&raw)
        }
        _ => encode(format!("{}", rng.random::<i64>()).as_bytes()),
    }
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.rsplit('/').next().unwrap_or_default();
            &doc["components"]["schemas"][name]
        }
        None => schema,
    }
}

/// A JSON value generated from `schema` (mostly valid; exact validity is not needed: the
/// answer is checked either way).
fn generate(rng: &mut StdRng, doc: &Value, schema: &Value, depth: u32) -> Value {
    let schema = resolve(doc, schema);
    if depth > 6 {
        return Value::Null;
    }
    if let Some(options) = schema["oneOf"].as_array().or(schema["anyOf"].as_array()) {
        let pick = options.choose(rng).expect("oneOf options");
        return generate(rng, doc, pick, depth + 1);
    }
    if let Some(all) = schema["allOf"].as_array() {
        let mut out = serde_json::Map::new();
        for s in all {
            if let Value::Object(m) = generate(rng, doc, s, depth + 1) {
                out.extend(m);
            }
        }
        return Value::Object(out);
    }
    if let Some(values) = schema["enum"].as_array() {
        return values.choose(rng).cloned().unwrap_or(Value::Null);
    }
    if let Some(examples) = schema["examples"].as_array()
        && rng.random_bool(0.3)
        && let Some(e) = examples.choose(rng)
    {
        return e.clone();
    }
    let ty = match &schema["type"] {
        Value::String(t) => t.clone(),
        Value::Array(ts) => ts
            .choose(rng)
            .and_then(Value::as_str)
            .unwrap_or("null")
            .to_owned(),
        _ if schema["properties"].is_object() => "object".to_owned(),
        _ => "null".to_owned(),
    };
    match ty.as_str() {
        "object" => {
            let mut out = serde_json::Map::new();
            let required: Vec<&str> = schema["required"]
                .as_array()
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if let Some(props) = schema["properties"].as_object() {
                for (k, v) in props {
                    if required.contains(&k.as_str()) || rng.random_bool(0.6) {
                        out.insert(k.clone(), generate(rng, doc, v, depth + 1));
                    }
                }
            }
            if schema["additionalProperties"].is_object() {
                for _ in 0..rng.random_range(0..3) {
                    let key = ["team", "a.b", "PGPASSWORD", "k", "x/y"]
                        .choose(rng)
                        .expect("keys");
                    let v = generate(rng, doc, &schema["additionalProperties"], depth + 1);
                    out.insert((*key).to_owned(), v);
                }
            }
            Value::Object(out)
        }
        "array" => Value::Array(
            (0..rng.random_range(0..4))
                .map(|_| generate(rng, doc, &schema["items"], depth + 1))
                .collect(),
        ),
        "string" => {
            let choices = ["x", "web-1", "nosuch", "/tmp/x", "python3", "db-seeded", ""];
            json!(choices.choose(rng).expect("strings"))
        }
        "integer" => {
            let min = schema["minimum"].as_i64().unwrap_or(0);
            let max = schema["maximum"].as_i64().unwrap_or(min + 70_000);
            json!(rng.random_range(min..=max.max(min)))
        }
        "number" => json!(rng.random::<f64>()),
        "boolean" => json!(rng.random_bool(0.5)),
        _ => Value::Null,
    }
}

/// A hostile value in place of a well-formed one.
fn hostile_value(rng: &mut StdRng) -> Value {
    match rng.random_range(0..10) {
        0 => json!(u64::MAX),
        1 => json!(i64::MIN),
        2 => json!(1e308),
        3 => json!(-1),
        4 => json!("x".repeat(5000)),
        5 => json!([1, "a", null]),
        6 => json!({"nested": {"deeper": [true]}}),
        7 => json!("\u{0}"),
        8 => json!(true),
        _ => Value::Null,
    }
}

/// `value` with one field (at any depth) replaced by a hostile value, or an unknown field.
fn mutate_value(rng: &mut StdRng, value: &mut Value) {
    match value {
        Value::Object(m) if !m.is_empty() && rng.random_bool(0.7) => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = keys.choose(rng).expect("non-empty").clone();
            let v = m.get_mut(&k).expect("present");
            if rng.random_bool(0.5) {
                mutate_value(rng, v);
            } else {
                *v = hostile_value(rng);
            }
        }
        Value::Object(m) => {
            m.insert("unknown_field".to_owned(), hostile_value(rng));
        }
        Value::Array(a) if !a.is_empty() => {
            let i = rng.random_range(0..a.len());
            mutate_value(rng, &mut a[i]);
        }
        other => *other = hostile_value(rng),
    }
}

/// A body for `op`: valid per its schema, or broken in one of many ways.
fn body_for(rng: &mut StdRng, doc: &Value, op: &Op, bad: &mut bool) -> Vec<u8> {
    let Some((content_type, schema)) = &op.body else {
        if rng.random_bool(0.1) {
            *bad = true;
            return br#"{"unexpected": "body"}"#.to_vec();
        }
        return Vec::new();
    };
    if content_type != "application/json" {
        return (0..rng.random_range(0..2000))
            .map(|_| rng.random())
            .collect();
    }
    let mut value = generate(rng, doc, schema, 0);
    if rng.random_bool(0.4) {
        return serde_json::to_vec(&value).expect("serialisable");
    }
    *bad = true;
    match rng.random_range(0..10) {
        0 => [
            &b"[\"base\",2,512,true]"[..],
            b"[true]",
            b"5",
            b"\"x\"",
            b"null",
            b"true",
        ]
        .choose(rng)
        .expect("non-objects")
        .to_vec(),
        1 => {
            let mut text = serde_json::to_vec(&value).expect("serialisable");
            text.truncate(rng.random_range(0..=text.len()));
            text
        }
        2 => {
            let depth = rng.random_range(100..3000);
            let mut text = "[".repeat(depth);
            text.push_str(&"]".repeat(depth));
            format!("{{\"x\":{text}}}").into_bytes()
        }
        3 => (0..rng.random_range(1..300))
            .map(|_| rng.random())
            .collect(),
        4 => vec![b' '; MAX_BODY_BYTES as usize + 1 + rng.random_range(0..1000)],
        5 => br#"{"a":1,"a":2}"#.to_vec(),
        6 => b"{\"name\": \"\xff\xfe\"}".to_vec(),
        _ => {
            mutate_value(rng, &mut value);
            serde_json::to_vec(&value).expect("serialisable")
        }
    }
}

/// Builds one request for `op`. Never one that could build an image or run the doctor.
fn request_for(rng: &mut StdRng, doc: &Value, op: &Op) -> Req {
    let mut bad = false;
    let mut path = String::new();
    for seg in op.path.split('/').skip(1) {
        path.push('/');
        match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(name) => {
                let mut v = param_value(rng, name, &mut bad);
                // No image build can start: never a built-in recipe's name.
                if op.id == "image_build" {
                    let decoded = decode(&v);
                    if kiln_image::builtin_names()
                        .iter()
                        .any(|n| n.as_bytes() == decoded.as_slice())
                    {
                        v = "nosuch-recipe".to_owned();
                    }
                }
                path.push_str(&v);
            }
            None => path.push_str(seg),
        }
    }
    let mut query = Vec::new();
    for (name, place, required, _) in &op.params {
        if place != "query" {
            continue;
        }
        if *required || rng.random_bool(0.5) {
            query.push(format!("{name}={}", param_value(rng, name, &mut bad)));
        } else if rng.random_bool(0.05) {
            bad = true;
        }
    }
    if rng.random_bool(0.1) {
        bad = true;
        query.push(
            ["unknown=1", "path", "=", "&&", "follow=maybe", "label=%ff"]
                .choose(rng)
                .expect("queries")
                .to_string(),
        );
    }
    let mut target = path;
    if !query.is_empty() {
        target.push('?');
        target.push_str(&query.join("&"));
    }
    let mut method = op.method.clone();
    if rng.random_bool(0.1) {
        bad = true;
        method = [
            "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "FOO",
        ]
        .choose(rng)
        .expect("methods")
        .to_string();
    }
    if op.id == "doctor_get" && (method == "GET" || method == "HEAD") {
        method = "POST".to_owned();
        bad = true;
    }
    let body = body_for(rng, doc, op, &mut bad);
    let mut headers = Vec::new();
    let json_body = op
        .body
        .as_ref()
        .is_some_and(|(ct, _)| ct == "application/json");
    match rng.random_range(0..10) {
        0 => {}
        1 => {
            bad |= json_body;
            headers.push(("content-type".to_owned(), "text/plain".to_owned()));
        }
        2 => {
            bad = true;
            headers.push(("content-type".to_owned(), "application/json".to_owned()));
            headers.push(("content-type".to_owned(), "application/xml".to_owned()));
        }
        3 => headers.push(("expect".to_owned(), "100-continue".to_owned())),
        4 => headers.push(("x-junk".to_owned(), "y".repeat(rng.random_range(1..16_000)))),
        5 => {
            // A WebSocket handshake: only `sandbox_run` may upgrade (and then waits for a
            // first message that never comes: nothing starts).
            headers.push(("connection".to_owned(), "upgrade".to_owned()));
            headers.push(("upgrade".to_owned(), "websocket".to_owned()));
            headers.push(("sec-websocket-version".to_owned(), "13".to_owned()));
            headers.push((
                "sec-websocket-key".to_owned(),
                "dGhlIHNhbXBsZSBub25jZQ==".to_owned(),
            ));
        }
        6 => headers.push(("authorization".to_owned(), "Bearer nope".to_owned())),
        _ => {
            if let Some((ct, _)) = &op.body {
                headers.push(("content-type".to_owned(), ct.clone()));
            }
        }
    }
    let chunked = rng.random_bool(0.05);
    let short_body = !chunked && rng.random_bool(0.002);
    bad |= short_body;
    Req {
        method,
        target,
        headers,
        body,
        short_body,
        chunked,
        bad,
    }
}

/// Where a request goes: the unix socket (no token) or the TCP listener (bearer token).
enum Door {
    Unix(std::path::PathBuf),
    Tcp(std::net::SocketAddr),
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Stream for T {}

/// The answer's status, headers (lower-case names) and body (for errors; empty for a 2xx,
/// a 101 or a HEAD, whose bodies may never end).
async fn send(door: &Door, req: &Req) -> Result<(u16, Vec<(String, String)>, Vec<u8>), String> {
    let s: Box<dyn Stream> = match door {
        Door::Unix(path) => Box::new(
            tokio::net::UnixStream::connect(path)
                .await
                .map_err(|e| format!("connect: {e}"))?,
        ),
        Door::Tcp(addr) => Box::new(
            tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?,
        ),
    };
    let mut s = s;
    // The daemon may answer (and close) before reading all of a body it refuses.
    let _ = s.write_all(&req.bytes()).await;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    // Interim answers (`100 Continue`) come before the real one.
    let (status, headers, head_end) = loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err(format!(
                    "closed without an answer after {:?}",
                    String::from_utf8_lossy(&buf)
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.get(9..12))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line in {head:?}"))?;
        if (100..200).contains(&status) && status != 101 {
            buf.drain(..head_end);
            continue;
        }
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        break (status, headers, head_end);
    };
    let mut body = buf[head_end..].to_vec();
    if req.method == "HEAD" || status == 101 || (200..300).contains(&status) {
        return Ok((status, headers, Vec::new()));
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        while body.len() < len {
            let n = s
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read body: {e}"))?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        body.truncate(len);
    } else {
        // Chunked or until close: error bodies are small.
        let _ = s.read_to_end(&mut body).await;
        if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            body = dechunk(&body);
        }
    }
    Ok((status, headers, body))
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = raw.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&raw[..i]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = i + 2;
        let end = (start + size).min(raw.len());
        out.extend_from_slice(&raw[start..end]);
        raw = &raw[(end + 2).min(raw.len())..];
    }
    out
}

/// Does the raw path `path` match the template (a `{param}` matches one non-empty segment)?
fn matches(template: &str, path: &str) -> bool {
    let t: Vec<&str> = template.split('/').collect();
    let p: Vec<&str> = path.split('/').collect();
    t.len() == p.len()
        && t.iter().zip(&p).all(|(t, p)| {
            if t.starts_with('{') {
                !p.is_empty()
            } else {
                t == p
            }
        })
}

/// The statuses an answer to `req` may have.
fn allowed(ops: &[Op], req: &Req) -> (BTreeSet<u16>, String) {
    let path = req.target.split('?').next().unwrap_or_default();
    let mut out: BTreeSet<u16> = [405, 408, 413, 414].into();
    let on_path: Vec<&Op> = ops.iter().filter(|o| matches(&o.path, path)).collect();
    let method = if req.method == "HEAD" {
        "GET"
    } else {
        req.method.as_str()
    };
    match on_path.iter().find(|o| o.method == method) {
        Some(op) => {
            out.extend(&op.statuses);
            (out, op.id.clone())
        }
        None if on_path.is_empty() => {
            out.insert(404);
            (out, "(no route)".to_owned())
        }
        None => (out, "(wrong method)".to_owned()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_fuzz_every_route_no_5xx_and_answers_on_schema() {
    let seed = std::env::var("KILN_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random::<u64>());
    let rounds: u64 = std::env::var("KILN_FUZZ_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_ROUNDS);
    println!("api fuzz seed: {seed} (KILN_FUZZ_SEED={seed} KILN_FUZZ_ROUNDS={rounds} to replay)");
    let doc: Value = serde_json::from_str(&crate::openapi::openapi_json()).expect("the document");
    let ops = operations(&doc);
    assert!(
        ops.len() >= 38,
        "only {} operations in the document",
        ops.len()
    );

    let dir = tempfile::tempdir().expect("temp home");
    let engine = kiln_core::Engine::start(kiln_core::Home::new(dir.path().to_owned()))
        .await
        .expect("test engine");
    assert!(
        engine.image_list().expect("images").is_empty(),
        "the temp home must hold no image"
    );
    let settings = Settings {
        listen: None,
        max_body_bytes: MAX_BODY_BYTES,
        max_connections: 64,
        header_timeout: Duration::from_secs(30),
        pools: Vec::new(),
        body_timeout: BODY_TIMEOUT,
        view_listen: "127.0.0.1:0".parse().expect("address"),
        view_ttl: Duration::from_secs(60),
        novnc_dir: crate::view::DEFAULT_NOVNC_DIR.into(),
    };
    let viewers = crate::listen::tests::test_viewers(&engine, &settings);
    let socket = dir.path().join("fuzz.sock");
    let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
    let app = crate::listen::unix_app(Arc::clone(&engine), &settings, &viewers);
    let s = settings.clone();
    tokio::spawn(
        async move { crate::listen::serve(listener, app, &s, std::future::pending()).await },
    );
    // The TCP listener too, behind its bearer token.
    let token_path = kiln_client::ClientHome::new(dir.path().to_owned()).token();
    let token = kiln_client::token::read_or_create(&token_path).expect("token");
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let tcp_addr = tcp.local_addr().expect("address");
    let app = crate::listen::tcp_app(Arc::clone(&engine), &settings, &viewers, token_path);
    let s = settings.clone();
    tokio::spawn(async move { crate::listen::serve(tcp, app, &s, std::future::pending()).await });
    let (unix_door, tcp_door) = (Door::Unix(socket), Door::Tcp(tcp_addr));

    let mut rng = StdRng::seed_from_u64(seed);
    let (mut bad_inputs, mut five_xx, mut off_schema) = (0u64, 0u64, 0u64);
    let mut failures = Vec::new();
    let mut seen = std::collections::BTreeMap::<u16, u64>::new();
    for round in 0..rounds {
        let op = ops.choose(&mut rng).expect("operations");
        let mut req = request_for(&mut rng, &doc, op);
        bad_inputs += u64::from(req.bad);
        // A quarter go to the TCP listener: with the token, unless the request carries a
        // wrong one (then only 401 is right).
        let over_tcp = rng.random_bool(0.25);
        let wrong_token = over_tcp && req.headers.iter().any(|(k, _)| k == "authorization");
        if over_tcp && !wrong_token {
            req.headers
                .push(("authorization".to_owned(), format!("Bearer {token}")));
        }
        let door = if over_tcp { &tcp_door } else { &unix_door };
        let answer = tokio::time::timeout(ANSWER_DEADLINE, send(door, &req)).await;
        let (status, _headers, body) = match answer {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                off_schema += 1;
                failures.push(format!("round {round}: {e}: {}", req.describe()));
                continue;
            }
            Err(_) => {
                off_schema += 1;
                failures.push(format!("round {round}: no answer: {}", req.describe()));
                continue;
            }
        };
        *seen.entry(status).or_default() += 1;
        let (statuses, reached) = if wrong_token {
            ([401].into(), "(wrong token)".to_owned())
        } else {
            allowed(&ops, &req)
        };
        let mut problem = None;
        if status >= 500 {
            five_xx += 1;
            problem = Some("5xx".to_owned());
        } else if !statuses.contains(&status) && status != 101 {
            problem = Some(format!("status {status} not in {statuses:?} of {reached}"));
        } else if !(200..300).contains(&status) && status != 101 && req.method != "HEAD" {
            match serde_json::from_slice::<kiln_api_types::ApiError>(&body) {
                Ok(e) if e.code.parse::<kiln_api_types::ErrorCode>().is_err() => {
                    problem = Some(format!("code {:?} is not an ErrorCode", e.code));
                }
                Ok(e) if status == 401 && e.code != "unauthorized" => {
                    problem = Some(format!("401 with code {:?}", e.code));
                }
                Ok(e) if status == 404 && reached == "(no route)" && e.code != "not_found" => {
                    problem = Some(format!("unrouted 404 with code {:?}", e.code));
                }
                Ok(_) => {}
                Err(e) => problem = Some(format!("body is not an ApiError ({e})")),
            }
        }
        if status == 101 && reached != "sandbox_run" {
            problem = Some(format!("101 from {reached}"));
        }
        if op.id == "image_build" && (200..300).contains(&status) {
            problem = Some("an image build started".to_owned());
        }
        if let Some(p) = problem {
            if status < 500 {
                off_schema += 1;
            }
            failures.push(format!(
                "round {round}: {p}: {} -> {status} {}",
                req.describe(),
                String::from_utf8_lossy(&body[..body.len().min(300)])
            ));
        }
    }
    let summary = format!(
        "api fuzz: {rounds} requests, {bad_inputs} bad inputs, {five_xx} 5xx, {off_schema} off-schema"
    );
    for f in failures.iter().take(30) {
        println!("{f}");
    }
    println!("answers by status: {seen:?}");
    println!("{summary}");
    assert!(
        failures.is_empty(),
        "{summary} (seed {seed}); first failures:\n{}",
        failures
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        engine
            .sandbox_list(&Default::default())
            .expect("list")
            .is_empty(),
        "a sandbox was created"
    );
}
