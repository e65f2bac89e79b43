//! What the CLI's fake-daemon tests share: reading one HTTP/1.1 request off a connection and
//! writing one answer. Just enough HTTP for the `kiln` binary's client (Content-Length
//! bodies, keep-alive); nothing of any route.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// One request read off `conn` (bytes read past it stay in `buf`): method, path with its
/// query, body. `None` once the client closed the connection.
pub async fn read_request(
    conn: &mut UnixStream,
    buf: &mut Vec<u8>,
) -> Option<(String, String, Vec<u8>)> {
    let (method, path, body_len, head_len) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(n)) = req.parse(buf) {
            let len = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                .unwrap_or(0usize);
            break (
                req.method.unwrap_or_default().to_owned(),
                req.path.unwrap_or_default().to_owned(),
                len,
                n,
            );
        }
        read_more(conn, buf).await?;
    };
    while buf.len() < head_len + body_len {
        read_more(conn, buf).await?;
    }
    let body = buf.drain(..head_len + body_len).skip(head_len).collect();
    Some((method, path, body))
}

async fn read_more(conn: &mut UnixStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 4096];
    match conn.read(&mut chunk).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Some(())
        }
    }
}

/// Writes one answer; false if the client is gone.
pub async fn write_answer(conn: &mut UnixStream, status: u16, ctype: &str, body: &str) -> bool {
    let head = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.is_ok() && conn.write_all(body.as_bytes()).await.is_ok()
}
