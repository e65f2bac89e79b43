//! What the first bytes of a TCP connection say about the name it is for: a TLS ClientHello's
//! SNI, or an HTTP/1 request's `Host`. Pure and bounded: hand-written TLS parser that never
//! reads past its input, `httparse` for HTTP.
//!
//! Must not: hold bytes (the filter does, up to [`MAX_INSPECT_BYTES`]) or decide policy.
//!
//! ```text
//! TLS record:   type(1)=0x16 version(2) length(2) | handshake: type(1)=1 length(3)
//! ClientHello:  version(2) random(32) sid_len(1) sid cs_len(2) cs comp_len(1) comp
//!               ext_len(2) { ext_type(2) ext_len(2) data }*
//! server_name (type 0): list_len(2) { name_type(1)=0 name_len(2) name }*
//! ```

/// Most bytes held per connection while deciding.
pub const MAX_INSPECT_BYTES: usize = 16 * 1024;

/// Longest accepted DNS name in SNI or Host.
const MAX_NAME: usize = 253;

/// What the connection's first bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inspection {
    /// Not enough bytes to tell yet.
    NeedMore,
    /// A TLS ClientHello; its SNI (lowercase, no trailing dot) when it has a valid one.
    Tls(Option<String>),
    /// An HTTP/1 request; its `Host` without port (lowercase) when it has a valid one.
    Http(Option<String>),
    /// Neither TLS nor HTTP.
    Other,
}

/// Inspects the first bytes of a client's stream (`buf` is everything seen so far).
pub fn inspect(buf: &[u8]) -> Inspection {
    let Some(&first) = buf.first() else {
        return Inspection::NeedMore;
    };
    if first == 0x16 {
        return tls_client_hello(buf);
    }
    match http_method_prefix(buf) {
        MethodPrefix::Yes => http_request(buf),
        MethodPrefix::Partial => Inspection::NeedMore,
        MethodPrefix::No => Inspection::Other,
    }
}

/// Final verdict when no more bytes will come (FIN, or the hold limit reached): an
/// incomplete TLS or HTTP start counts as TLS/HTTP without a name.
pub fn inspect_final(buf: &[u8]) -> Inspection {
    match inspect(buf) {
        Inspection::NeedMore if buf.first() == Some(&0x16) => Inspection::Tls(None),
        Inspection::NeedMore if buf.is_empty() => Inspection::Other,
        Inspection::NeedMore => Inspection::Http(None),
        other => other,
    }
}

enum MethodPrefix {
    Yes,
    Partial,
    No,
}

const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

fn http_method_prefix(buf: &[u8]) -> MethodPrefix {
    let mut partial = false;
    for m in METHODS {
        if buf.starts_with(m) {
            return MethodPrefix::Yes;
        }
        if buf.len() < m.len() && m.starts_with(buf) {
            partial = true;
        }
    }
    if partial {
        MethodPrefix::Partial
    } else {
        MethodPrefix::No
    }
}

fn http_request(buf: &[u8]) -> Inspection {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => Inspection::NeedMore,
        Err(_) => Inspection::Http(None),
        Ok(httparse::Status::Complete(_)) => {
            let mut hosts = req
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("host"));
            let host = match (hosts.next(), hosts.next()) {
                (Some(h), None) => std::str::from_utf8(h.value).ok().and_then(host_name),
                // Missing or repeated Host: no trustworthy name.
                _ => None,
            };
            Inspection::Http(host)
        }
    }
}

/// `name[:port]` → lowercase name, when it is a plausible DNS name.
fn host_name(v: &str) -> Option<String> {
    let v = v.trim();
    let name = match v.rsplit_once(':') {
        Some((n, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => n,
        Some(_) => return None,
        None => v,
    };
    dns_name(name.as_bytes())
}

/// A DNS name (letters, digits, `-`, `_`, dots), lowercase, trailing dot removed.
fn dns_name(b: &[u8]) -> Option<String> {
    let b = b.strip_suffix(b".").unwrap_or(b);
    let ok = !b.is_empty()
        && b.len() <= MAX_NAME
        && b.split(|c| *c == b'.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.iter()
                    .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
        });
    ok.then(|| String::from_utf8_lossy(b).to_ascii_lowercase())
}

/// A bounds-checked reader.
struct Rd<'a> {
    b: &'a [u8],
}

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

fn tls_client_hello(buf: &[u8]) -> Inspection {
    // Reassemble the handshake message from consecutive handshake records (a ClientHello may
    // span records); never more than MAX_INSPECT_BYTES.
    let mut hs: Vec<u8> = Vec::new();
    let mut rd = Rd { b: buf };
    loop {
        let Some(hdr) = rd.take(5) else {
            return Inspection::NeedMore;
        };
        if hdr[0] != 0x16 || hdr[1] != 3 {
            return Inspection::Tls(None);
        }
        let len = usize::from(u16::from_be_bytes([hdr[3], hdr[4]]));
        if len == 0 || len > 16384 + 2048 {
            return Inspection::Tls(None);
        }
        let Some(body) = rd.take(len) else {
            // Partial record: use what is there if the handshake header says it is enough.
            hs.extend_from_slice(rd.b);
            return match parse_hello(&hs) {
                Some(r) => r,
                None => Inspection::NeedMore,
            };
        };
        hs.extend_from_slice(body);
        if hs.len() > MAX_INSPECT_BYTES {
            return Inspection::Tls(None);
        }
        if let Some(r) = parse_hello(&hs) {
            return r;
        }
    }
}

/// `None` while the handshake message is incomplete.
fn parse_hello(hs: &[u8]) -> Option<Inspection> {
    let mut rd = Rd { b: hs };
    let t = rd.u8()?;
    let len = rd.u24()?;
    if t != 1 || len > MAX_INSPECT_BYTES {
        return Some(Inspection::Tls(None));
    }
    let body = rd.take(len)?;
    Some(Inspection::Tls(sni(body)))
}

fn sni(body: &[u8]) -> Option<String> {
    let mut rd = Rd { b: body };
    rd.take(2 + 32)?;
    rd.vec8()?;
    rd.vec16()?;
    rd.vec8()?;
    let mut exts = Rd { b: rd.vec16()? };
    let mut found = None;
    while !exts.b.is_empty() {
        let t = exts.u16()?;
        let data = exts.vec16()?;
        if t != 0 {
            continue;
        }
        if found.is_some() {
            return None; // two server_name extensions: ambiguous
        }
        let mut list = Rd {
            b: Rd { b: data }.vec16()?,
        };
        let mut names = Vec::new();
        while !list.b.is_empty() {
            let nt = list.u8()?;
            let name = list.vec16()?;
            if nt == 0 {
                names.push(name);
            }
        }
        // Exactly one host_name (RFC 6066 forbids more than one of a type).
        if names.len() != 1 {
            return None;
        }
        found = Some(dns_name(names[0])?);
    }
    found
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal but well-formed ClientHello record with `sni` (or none).
    pub(crate) fn client_hello(sni: Option<&str>) -> Vec<u8> {
        let mut exts = Vec::new();
        // An unrelated extension first (supported_groups).
        exts.extend_from_slice(&[0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x1d]);
        if let Some(n) = sni {
            let n = n.as_bytes();
            let entry_len = 3 + n.len();
            exts.extend_from_slice(&[0, 0]);
            exts.extend_from_slice(&((entry_len + 2) as u16).to_be_bytes());
            exts.extend_from_slice(&(entry_len as u16).to_be_bytes());
            exts.push(0);
            exts.extend_from_slice(&(n.len() as u16).to_be_bytes());
            exts.extend_from_slice(n);
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn inspect_tls_sni_found_and_lowercased() {
        let r = client_hello(Some("Example.ORG"));
        assert_eq!(inspect(&r), Inspection::Tls(Some("example.org".into())));
        assert_eq!(inspect(&client_hello(None)), Inspection::Tls(None));
    }

    #[test]
    fn inspect_tls_truncations_need_more_then_final_has_no_name() {
        let r = client_hello(Some("example.org"));
        for cut in 1..r.len() {
            assert_eq!(inspect(&r[..cut]), Inspection::NeedMore, "cut {cut}");
            assert_eq!(inspect_final(&r[..cut]), Inspection::Tls(None), "cut {cut}");
        }
    }

    #[test]
    fn inspect_tls_split_across_records() {
        let r = client_hello(Some("example.org"));
        let hs = &r[5..];
        let (a, b) = hs.split_at(20);
        let mut two = vec![0x16, 3, 1];
        two.extend_from_slice(&(a.len() as u16).to_be_bytes());
        two.extend_from_slice(a);
        two.extend_from_slice(&[0x16, 3, 1]);
        two.extend_from_slice(&(b.len() as u16).to_be_bytes());
        two.extend_from_slice(b);
        assert_eq!(inspect(&two), Inspection::Tls(Some("example.org".into())));
    }

    #[test]
    fn inspect_tls_hostile_lengths_give_no_name() {
        let mut r = client_hello(Some("example.org"));
        // Handshake length far beyond the limit.
        r[6] = 0xff;
        assert_eq!(inspect(&r), Inspection::Tls(None));
        // SNI name length pointing past the end.
        let mut r = client_hello(Some("example.org"));
        let n = r.len();
        r[n - 12] = 0xff;
        assert_eq!(inspect_final(&r), Inspection::Tls(None));
        // Not a handshake record.
        assert_eq!(inspect(&[0x16, 9, 9, 0, 1, 0]), Inspection::Tls(None));
        // A name with bytes a DNS name cannot hold.
        assert_eq!(
            inspect(&client_hello(Some("exa mple.org"))),
            Inspection::Tls(None)
        );
    }

    #[test]
    fn inspect_http_host() {
        let req = b"GET / HTTP/1.1\r\nHost: Example.org:8080\r\nAccept: */*\r\n\r\n";
        assert_eq!(inspect(req), Inspection::Http(Some("example.org".into())));
        assert_eq!(inspect(&req[..20]), Inspection::NeedMore);
        assert_eq!(inspect(b"GE"), Inspection::NeedMore);
        assert_eq!(
            inspect(b"GET / HTTP/1.1\r\nAccept: x\r\n\r\n"),
            Inspection::Http(None)
        );
        assert_eq!(
            inspect(b"GET / HTTP/1.1\r\nHost: a.org\r\nHost: b.org\r\n\r\n"),
            Inspection::Http(None)
        );
        assert_eq!(inspect_final(&req[..20]), Inspection::Http(None));
    }

    #[test]
    fn inspect_other_protocols() {
        assert_eq!(inspect(b"SSH-2.0-OpenSSH\r\n"), Inspection::Other);
        assert_eq!(inspect(&[0, 0, 0, 8, 4, 210, 22, 47]), Inspection::Other);
        assert_eq!(inspect_final(b""), Inspection::Other);
    }

    proptest::proptest! {
        #[test]
        fn inspect_random_bytes_never_panic(b in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = inspect(&b);
            let _ = inspect_final(&b);
            let mut t = vec![0x16u8, 3, 1];
            t.extend_from_slice(&b);
            let _ = inspect(&t);
        }
    }
}
