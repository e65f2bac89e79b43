//! A job's output streams: each kept up to the job's `max_output`, and turned into text for
//! the API without splitting a character that arrived in two reads.
//!
//! Owns the bytes of one stream, how many of them are kept, and the text handed out so far.
//! Must not: know where the bytes come from or what a job does once a stream is over its limit
//! (the runner stops the program).

/// One output stream of a job.
#[derive(Debug, Default)]
pub(crate) struct Capture {
    /// The bytes kept (at most the limit).
    bytes: Vec<u8>,
    /// How many of `bytes` were handed out as text (the rest is an unfinished character).
    emitted: usize,
    /// Whether bytes were dropped at the limit.
    pub truncated: bool,
}

impl Capture {
    /// Keeps what of `data` fits under `limit` and returns the text that became complete
    /// (empty if none); `truncated` says whether some of `data` was dropped.
    pub fn push(&mut self, data: &[u8], limit: u64) -> String {
        let room = (limit as usize).saturating_sub(self.bytes.len());
        if data.len() > room {
            self.truncated = true;
        }
        self.bytes.extend_from_slice(&data[..data.len().min(room)]);
        let (text, used) = decode(&self.bytes[self.emitted..], self.truncated);
        self.emitted += used;
        text
    }

    /// The text handed out so far (for a late reader's replay).
    pub fn emitted_text(&self) -> String {
        String::from_utf8_lossy(&self.bytes[..self.emitted]).into_owned()
    }

    /// Everything kept, as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// Ends the stream: the text of an unfinished character at the end (replaced).
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.bytes[self.emitted..]).into_owned();
        self.emitted = self.bytes.len();
        rest
    }
}

/// Decodes `bytes` as UTF-8, replacing invalid sequences, and stops before an incomplete
/// character at the end unless `last` (nothing more will come). Returns the text and how many
/// bytes it covers.
fn decode(bytes: &[u8], last: bool) -> (String, usize) {
    let mut out = String::new();
    let mut at = 0;
    loop {
        match std::str::from_utf8(&bytes[at..]) {
            Ok(s) => {
                out.push_str(s);
                return (out, bytes.len());
            }
            Err(e) => {
                let valid = e.valid_up_to();
                out.push_str(&String::from_utf8_lossy(&bytes[at..at + valid]));
                at += valid;
                match e.error_len() {
                    Some(n) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        at += n;
                    }
                    None if last => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        return (out, bytes.len());
                    }
                    None => return (out, at),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_character_split_between_reads_is_handed_out_whole() {
        let mut c = Capture::default();
        let snow = "☃".as_bytes();
        assert_eq!(c.push(b"a", 100), "a");
        assert_eq!(c.push(&snow[..1], 100), "");
        assert_eq!(c.emitted_text(), "a");
        assert_eq!(c.push(&snow[1..], 100), "☃");
        assert_eq!(c.push(b"\xffz", 100), "\u{fffd}z");
        assert_eq!(c.text(), "a☃\u{fffd}z");
        assert!(!c.truncated);
    }

    #[test]
    fn bytes_past_the_limit_are_dropped_and_said() {
        let mut c = Capture::default();
        assert_eq!(c.push(b"hello", 8), "hello");
        assert_eq!(c.push(b"world", 8), "wor");
        assert!(c.truncated);
        assert_eq!(c.push(b"more", 8), "");
        assert_eq!(c.text(), "hellowor");
    }

    #[test]
    fn a_cut_character_at_the_limit_and_at_the_end_is_replaced() {
        let mut c = Capture::default();
        // The limit cuts the snowman after its first byte: nothing more will come.
        assert_eq!(c.push("ab☃".as_bytes(), 3), "ab\u{fffd}");
        let mut d = Capture::default();
        assert_eq!(d.push(&"☃".as_bytes()[..2], 10), "");
        assert_eq!(d.finish(), "\u{fffd}");
        assert_eq!(d.finish(), "");
    }
}
