//! JSON objects written straight into a byte buffer, for the bodies and
//! records made for every message (the bot's and the response endpoint's
//! requests, the answer to the client, the stored messages).
//!
//! The output is byte for byte what `serde_json::to_vec` makes of the same
//! fields in the same order (the tests hold it to that), at a fraction of its
//! cost: keys are written as they are, strings are scanned eight bytes at a
//! time for what needs escaping, and nothing is allocated but the buffer.

use serde_json::value::RawValue;

/// An object being written: `{`, then `"key":value` pairs, then `}` on [`Obj::end`].
pub struct Obj<'b> {
    out: &'b mut Vec<u8>,
    first: bool,
}

impl<'b> Obj<'b> {
    /// Starts an object at the end of `out`.
    pub fn new(out: &'b mut Vec<u8>) -> Self {
        out.push(b'{');
        Self { out, first: true }
    }

    /// Writes `"key":`. Keys are names the relay chooses: nothing in them
    /// needs escaping.
    fn key(&mut self, key: &'static str) {
        debug_assert!(!key.bytes().any(needs_escape), "key {key:?}");
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    pub fn str(&mut self, key: &'static str, value: &str) -> &mut Self {
        self.key(key);
        string(self.out, value);
        self
    }

    pub fn raw(&mut self, key: &'static str, value: &RawValue) -> &mut Self {
        self.key(key);
        self.out.extend_from_slice(value.get().as_bytes());
        self
    }

    pub fn u64(&mut self, key: &'static str, value: u64) -> &mut Self {
        self.key(key);
        self.out
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
        self
    }

    /// A string written with `Display`, which must need no escaping (a
    /// timestamp, say).
    pub fn display(&mut self, key: &'static str, value: &impl std::fmt::Display) -> &mut Self {
        use std::io::Write;
        self.key(key);
        let start = self.out.len();
        write!(self.out, "\"{value}\"").expect("writing to a Vec does not fail");
        debug_assert!(
            !self.out[start + 1..self.out.len() - 1]
                .iter()
                .any(|&b| needs_escape(b))
        );
        self
    }

    pub fn bool(&mut self, key: &'static str, value: bool) -> &mut Self {
        self.key(key);
        self.out
            .extend_from_slice(if value { b"true" } else { b"false" });
        self
    }

    /// A nested object, written by `fill`.
    pub fn obj(&mut self, key: &'static str, fill: impl FnOnce(&mut Obj<'_>)) -> &mut Self {
        self.key(key);
        let mut inner = Obj::new(self.out);
        fill(&mut inner);
        inner.end();
        self
    }

    pub fn end(self) {
        self.out.push(b'}');
    }
}

/// Room to make for an object whose string values are `strings`, plus
/// `more` bytes (a raw value, say): their bytes, and 256 for the keys,
/// punctuation, numbers and a few escapes.
pub fn room(strings: &[&str], more: usize) -> usize {
    256 + strings.iter().map(|s| s.len()).sum::<usize>() + more
}

/// Whether a byte of a string is written escaped.
fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);

/// Whether any of the eight bytes in `word` needs escaping (a control
/// character, `"` or `\`). Bytes of 0x80 and over never do.
fn any_escape(word: u64) -> bool {
    let below_space = word.wrapping_sub(ONES * 0x20);
    let quote = word ^ (ONES * u64::from(b'"'));
    let backslash = word ^ (ONES * u64::from(b'\\'));
    let zero_in = |x: u64| x.wrapping_sub(ONES);
    (below_space | zero_in(quote) | zero_in(backslash)) & !word & HIGHS != 0
}

/// Where the first byte that needs escaping is, eight bytes at a time.
fn first_escape(bytes: &[u8]) -> Option<usize> {
    let mut chunks = bytes.chunks_exact(8);
    let mut at = 0;
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes(chunk.try_into().expect("eight bytes"));
        if any_escape(word) {
            return chunk.iter().position(|&b| needs_escape(b)).map(|p| at + p);
        }
        at += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| needs_escape(b))
        .map(|p| at + p)
}

/// Writes `s` as a JSON string, escaped as `serde_json` escapes it.
pub fn string(out: &mut Vec<u8>, s: &str) {
    let mut rest = s.as_bytes();
    out.reserve(rest.len() + 2);
    out.push(b'"');
    while let Some(at) = first_escape(rest) {
        out.extend_from_slice(&rest[..at]);
        escape(out, rest[at]);
        rest = &rest[at + 1..];
    }
    out.extend_from_slice(rest);
    out.push(b'"');
}

fn escape(out: &mut Vec<u8>, b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    match b {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        b'\n' => out.extend_from_slice(b"\\n"),
        b'\r' => out.extend_from_slice(b"\\r"),
        b'\t' => out.extend_from_slice(b"\\t"),
        0x08 => out.extend_from_slice(b"\\b"),
        0x0c => out.extend_from_slice(b"\\f"),
        _ => out.extend_from_slice(&[
            b'\\',
            b'u',
            b'0',
            b'0',
            HEX[usize::from(b >> 4)],
            HEX[usize::from(b & 0x0f)],
        ]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn ours(s: &str) -> String {
        let mut out = Vec::new();
        string(&mut out, s);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn every_ascii_character_is_escaped_as_serde_json_escapes_it() {
        for c in 0u8..=0x7f {
            let s = format!("a{}b", c as char);
            assert_eq!(
                ours(&s),
                serde_json::to_string(&s).unwrap(),
                "byte {c:#04x}"
            );
            // In every position of an eight-byte word, and past it.
            for at in 0..17 {
                let mut s = "x".repeat(at);
                s.push(c as char);
                s.push_str("yz");
                assert_eq!(
                    ours(&s),
                    serde_json::to_string(&s).unwrap(),
                    "byte {c:#04x} at {at}"
                );
            }
        }
    }

    #[test]
    fn random_strings_come_out_as_serde_json_writes_them() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let alphabet: Vec<char> = "ab\"\\\n\t\u{1}\u{1f}\u{7f} é€😀/<>".chars().collect();
        for _ in 0..5000 {
            let len = rng.random_range(0..40);
            let s: String = (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            assert_eq!(ours(&s), serde_json::to_string(&s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn objects_nest_and_take_every_kind_of_value() {
        let raw = RawValue::from_string(r#"{"a":[1,2]}"#.to_owned()).unwrap();
        let mut out = Vec::new();
        let mut o = Obj::new(&mut out);
        o.str("s", "q\"")
            .raw("r", &raw)
            .u64("n", u64::MAX)
            .bool("t", true)
            .bool("f", false)
            .display("d", &42)
            .obj("o", |inner| {
                inner.str("x", "");
            })
            .obj("e", |_| {});
        o.end();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"s":"q\"","r":{"a":[1,2]},"n":18446744073709551615,"t":true,"f":false,"d":"42","o":{"x":""},"e":{}}"#
        );
    }
}
