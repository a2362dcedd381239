//! W3C Trace Context (`traceparent` / `tracestate`): taken from the client,
//! kept with the message in the store, and sent on every delivery as a child
//! of it: same trace id, a new span id per attempt.
//!
//! The relay records no spans of its own (no exporter): it only carries the
//! context, so that the back-end, the bot and the response endpoint see one
//! trace per conversation turn.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;

pub const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
pub const TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

/// A valid trace context: its `traceparent` in version 00 form, and the
/// `tracestate` that came with it, if any. Stored with each message (as JSON,
/// `{"parent": "...", "state": "..."}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    pub parent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

/// Longest `tracestate` passed on (the W3C limit is 512 characters that a
/// vendor must propagate; longer ones may be dropped).
const MAX_TRACESTATE: usize = 512;
/// Most list members of a `tracestate`.
const MAX_TRACESTATE_MEMBERS: usize = 32;

fn lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Appends `bytes` random bytes, never all zero (invalid for trace and span
/// ids), as lower-case hex.
fn push_random_hex(out: &mut String, bytes: usize) {
    use rand::RngCore;
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut raw = [0u8; 16];
    let raw = &mut raw[..bytes];
    while raw.iter().all(|&b| b == 0) {
        rand::rng().fill_bytes(raw);
    }
    for b in raw.iter() {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
}

/// A version-00 `traceparent` with a new span id: in trace `trace_id`, or in
/// a new trace; built in one string.
fn traceparent(trace_id: Option<&str>, flags: &str) -> String {
    let mut parent = String::with_capacity(55);
    parent.push_str("00-");
    match trace_id {
        Some(id) => parent.push_str(id),
        None => push_random_hex(&mut parent, 16),
    }
    parent.push('-');
    push_random_hex(&mut parent, 8);
    parent.push('-');
    parent.push_str(flags);
    parent
}

impl TraceContext {
    /// Reads `traceparent` (and `tracestate`) as the W3C Trace Context
    /// specification says: `None` when `traceparent` is absent or invalid (a
    /// new trace is then started, never an error for the caller). A
    /// `tracestate` that is not valid is dropped on its own.
    pub fn parse(traceparent: Option<&str>, tracestate: Option<&str>) -> Option<Self> {
        let parent = parse_traceparent(traceparent?.trim())?;
        let state = tracestate
            .map(str::trim)
            .filter(|s| valid_tracestate(s))
            .map(str::to_owned);
        Some(Self { parent, state })
    }

    /// From an HTTP request's headers (several `tracestate` headers are one
    /// list, joined with commas; several `traceparent` headers are invalid).
    pub fn from_headers(headers: &http::HeaderMap) -> Option<Self> {
        let mut parents = headers.get_all(TRACEPARENT).iter();
        let parent = parents.next()?.to_str().ok()?;
        if parents.next().is_some() {
            return None;
        }
        let states: Option<Vec<&str>> = headers
            .get_all(TRACESTATE)
            .iter()
            .map(|v| v.to_str().ok())
            .collect();
        let state = states.filter(|s| !s.is_empty()).map(|s| s.join(","));
        Self::parse(Some(parent), state.as_deref())
    }

    /// A new trace, started by the relay (sampled: whoever receives it decides).
    pub fn fresh() -> Self {
        Self {
            parent: traceparent(None, "01"),
            state: None,
        }
    }

    /// The 32 hex digits of the trace id.
    pub fn trace_id(&self) -> &str {
        &self.parent[3..35]
    }

    /// The span id of the parent (16 hex digits).
    pub fn span_id(&self) -> &str {
        &self.parent[36..52]
    }

    fn flags(&self) -> &str {
        &self.parent[53..55]
    }

    /// The context of one hop: same trace id and flags, a new span id, the
    /// same `tracestate`.
    pub fn child(&self) -> Self {
        Self {
            parent: traceparent(Some(self.trace_id()), self.flags()),
            state: self.state.clone(),
        }
    }

    /// `traceparent` and `tracestate`, for an outgoing request.
    pub fn headers(&self) -> Vec<(http::HeaderName, http::HeaderValue)> {
        let parent = http::HeaderValue::from_str(&self.parent).ok();
        let state = self
            .state
            .as_deref()
            .and_then(|s| http::HeaderValue::from_str(s).ok());
        [(TRACEPARENT, parent), (TRACESTATE, state)]
            .into_iter()
            .filter_map(|(name, value)| Some((name, value?)))
            .collect()
    }
}

/// `traceparent` in version 00 form, or `None` when invalid. A version above
/// 00 (but not ff) is read by its first four fields, as the specification
/// asks of a version 00 reader.
fn parse_traceparent(s: &str) -> Option<String> {
    if s.len() < 55 || !s.is_ascii() {
        return None;
    }
    let version = &s[0..2];
    if !lower_hex(version) || version == "ff" {
        return None;
    }
    if version == "00" && s.len() != 55 {
        return None;
    }
    if s.len() > 55 && s.as_bytes()[55] != b'-' {
        return None;
    }
    let b = s.as_bytes();
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let (trace_id, span_id, flags) = (&s[3..35], &s[36..52], &s[53..55]);
    if !lower_hex(trace_id) || !lower_hex(span_id) || !lower_hex(flags) {
        return None;
    }
    if trace_id.bytes().all(|c| c == b'0') || span_id.bytes().all(|c| c == b'0') {
        return None;
    }
    // Only the sampled flag is defined for version 00; others are not passed on.
    let flags = u8::from_str_radix(flags, 16).ok()? & 0x01;
    Some(format!("00-{trace_id}-{span_id}-{flags:02x}"))
}

/// Whether `s` is a `tracestate` list as the specification defines it:
/// up to 32 comma-separated `key=value` members, keys unique, printable
/// ASCII values without `,` or `=`, at most 512 characters.
fn valid_tracestate(s: &str) -> bool {
    if s.is_empty() || s.len() > MAX_TRACESTATE {
        return false;
    }
    let mut keys = Vec::new();
    for member in s.split(',').map(|m| m.trim_matches([' ', '\t'])) {
        if member.is_empty() {
            continue; // empty members are allowed and ignored
        }
        let Some((key, value)) = member.split_once('=') else {
            return false;
        };
        if !valid_key(key) || !valid_value(value) || keys.contains(&key) {
            return false;
        }
        keys.push(key);
    }
    !keys.is_empty() && keys.len() <= MAX_TRACESTATE_MEMBERS
}

fn valid_key(key: &str) -> bool {
    let simple = |k: &str, max: usize, first_digit: bool| {
        let mut bytes = k.bytes();
        let first_ok = match bytes.next() {
            Some(b'a'..=b'z') => true,
            Some(b'0'..=b'9') => first_digit,
            _ => false,
        };
        first_ok
            && k.len() <= max
            && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'*' | b'/'))
    };
    match key.split_once('@') {
        None => simple(key, 256, false),
        Some((tenant, system)) => simple(tenant, 241, true) && simple(system, 14, false),
    }
}

fn valid_value(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 256
        && !value.ends_with(' ')
        && value
            .bytes()
            .all(|b| (0x20..=0x7e).contains(&b) && b != b',' && b != b'=')
}

/// The trace of each conversation's latest user message, as this replica saw
/// it (delivered to the bot from here): the trace of a bot's message
/// that brings no `traceparent` of its own. Bounded: past `max` entries it
/// starts over, and such a bot message then gets a fresh trace.
pub struct ConversationTraces {
    latest: Mutex<HashMap<String, TraceContext>>,
    max: usize,
}

impl ConversationTraces {
    pub fn new(max: usize) -> Self {
        Self {
            latest: Mutex::new(HashMap::new()),
            max,
        }
    }

    pub fn note(&self, conversation_id: &str, trace: &TraceContext) {
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        // A conversation's next turn overwrites its entry in place.
        if let Some(entry) = latest.get_mut(conversation_id) {
            entry.clone_from(trace);
            return;
        }
        if latest.len() >= self.max {
            latest.clear();
        }
        latest.insert(conversation_id.to_owned(), trace.clone());
    }

    pub fn latest(&self, conversation_id: &str) -> Option<TraceContext> {
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(conversation_id)
            .cloned()
    }
}

impl Default for ConversationTraces {
    fn default() -> Self {
        Self::new(100_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specifications_example_is_read_and_children_keep_the_trace_id() {
        let t = TraceContext::parse(Some(VALID), Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"))
            .unwrap();
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.span_id(), "00f067aa0ba902b7");
        assert_eq!(
            t.state.as_deref(),
            Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
        );
        let (a, b) = (t.child(), t.child());
        assert_eq!(a.trace_id(), t.trace_id());
        assert_ne!(a.span_id(), t.span_id());
        assert_ne!(a.span_id(), b.span_id());
        assert!(a.parent.ends_with("-01"));
        assert_eq!(parse_traceparent(&a.parent), Some(a.parent.clone()));
        assert_eq!(a.state, t.state);
    }

    #[test]
    fn invalid_traceparents_are_ignored() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(Some(bad), None), None, "{bad:?}");
        }
        // A later version is read by its known fields.
        let t = TraceContext::parse(
            Some("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03-more"),
            None,
        )
        .unwrap();
        assert_eq!(
            t.parent,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(TraceContext::parse(None, Some("a=b")), None);
    }

    #[test]
    fn an_invalid_tracestate_is_dropped_alone() {
        for bad in ["=x", "A=b", "a=b,a=c", "a", "a=b=c", "a=\u{7f}"] {
            let t = TraceContext::parse(Some(VALID), Some(bad)).unwrap();
            assert_eq!(t.state, None, "{bad:?}");
        }
        let many: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert_eq!(
            TraceContext::parse(Some(VALID), Some(&many.join(",")))
                .unwrap()
                .state,
            None
        );
        let t = TraceContext::parse(Some(VALID), Some("tenant@vendor=x, b=y")).unwrap();
        assert!(t.state.is_some());
    }

    #[test]
    fn fresh_traces_are_valid_and_distinct() {
        let (a, b) = (TraceContext::fresh(), TraceContext::fresh());
        assert_eq!(parse_traceparent(&a.parent), Some(a.parent.clone()));
        assert_ne!(a.trace_id(), b.trace_id());
    }

    #[test]
    fn several_traceparent_headers_are_invalid() {
        let mut h = http::HeaderMap::new();
        h.append(TRACEPARENT, VALID.parse().unwrap());
        h.append(TRACESTATE, "a=1".parse().unwrap());
        h.append(TRACESTATE, "b=2".parse().unwrap());
        assert_eq!(
            TraceContext::from_headers(&h).unwrap().state.as_deref(),
            Some("a=1,b=2")
        );
        h.append(TRACEPARENT, VALID.parse().unwrap());
        assert_eq!(TraceContext::from_headers(&h), None);
    }

    #[test]
    fn conversation_traces_stay_bounded() {
        let traces = ConversationTraces::new(2);
        let t = TraceContext::fresh();
        traces.note("a", &t);
        traces.note("b", &t);
        traces.note("a", &t);
        assert!(traces.latest("b").is_some());
        traces.note("c", &t);
        assert!(traces.latest("a").is_none() && traces.latest("c").is_some());
    }

    /// A record of the version before traces were kept reads as a message
    /// without one; a record with one keeps it.
    #[test]
    fn stored_messages_of_the_previous_format_still_read() {
        use crate::store::{InboundMessage, OutboundMessage};
        let old_inbound = r#"{"id":"msg_1","conversation_id":"conv_1","user_id":"user_1","caller_conversation_id":"c","caller_user_id":"u","caller_message_id":"m","kind":"text","text":"hi","payload":{"text":"hi"},"created_at_ms":1700000000000,"queued_at_ms":1700000000000}"#;
        let m: InboundMessage = serde_json::from_str(old_inbound).unwrap();
        assert_eq!((m.text.as_str(), m.trace), ("hi", None));
        let old_outbound = r#"{"id":"msg_2","conversation_id":"conv_1","caller_conversation_id":"c","user_id":"user_1","kind":"text","payload":{"text":"yo"},"created_at_ms":1,"queued_at_ms":1}"#;
        let m: OutboundMessage = serde_json::from_str(old_outbound).unwrap();
        assert_eq!(m.trace, None);
        // Written without a trace, a message reads as the previous version wrote it.
        assert_eq!(serde_json::to_string(&m).unwrap(), old_outbound);
        let mut with = m.clone();
        with.trace = TraceContext::parse(Some(VALID), Some("a=b"));
        let back: OutboundMessage =
            serde_json::from_str(&serde_json::to_string(&with).unwrap()).unwrap();
        assert_eq!(back.trace, with.trace);
    }
}
