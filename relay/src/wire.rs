//! The JSON bodies of the HTTP contracts (see DESIGN.md): what clients and bots
//! send, and what the relay sends to the bot and to the response endpoint.

use crate::json::{self, Obj};
use crate::store::{InboundMessage, OutboundMessage};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use std::fmt::Display;
use std::time::{Duration, UNIX_EPOCH};

/// A request body that breaks the contract; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// `POST /v1/messages` as read: every field optional so that a missing or
/// mistyped one can be named in the error rather than reported by serde.
#[derive(Deserialize)]
struct ClientBody<'a> {
    #[serde(rename = "userId", borrow, default)]
    user_id: Option<&'a RawValue>,
    #[serde(rename = "messageId", borrow, default)]
    message_id: Option<&'a RawValue>,
    #[serde(rename = "conversationId", borrow, default)]
    conversation_id: Option<&'a RawValue>,
    #[serde(rename = "type", borrow, default)]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default)]
    text: Option<&'a RawValue>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
}

/// A valid client message.
#[derive(Debug, Clone)]
pub struct ClientMessage {
    pub user_id: String,
    pub message_id: String,
    pub conversation_id: String,
    pub kind: String,
    pub text: String,
    pub payload: Box<RawValue>,
}

/// Parses a body as a JSON object, or says why it is not one.
fn object<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Invalid> {
    let text = std::str::from_utf8(body).map_err(|e| {
        Invalid(format!(
            "body is not valid UTF-8 (at byte {})",
            e.valid_up_to()
        ))
    })?;
    if text.trim_start().is_empty() {
        return Err(Invalid("body is empty; expected a JSON object".into()));
    }
    object_at(text, "").map_err(|e| match e {
        NotObject::Json(e) => Invalid(format!("body is not valid JSON: {e}")),
        NotObject::Shape(None) => Invalid("body must be a JSON object".into()),
        NotObject::Shape(Some(field)) => twice(&field),
    })
}

fn twice(field: &str) -> Invalid {
    Invalid(format!("field `{field}` appears more than once"))
}

/// Why a JSON text is not the object expected.
enum NotObject {
    /// Not JSON at all.
    Json(serde_json::Error),
    /// JSON, but not an object (`None`), or an object that names this
    /// field twice.
    Shape(Option<String>),
}

/// Reads `text` as an object whose fields are named `{prefix}{key}` in errors.
fn object_at<'a, T: Deserialize<'a>>(text: &'a str, prefix: impl Display) -> Result<T, NotObject> {
    // Checked here because serde would read an array into a struct field by field.
    if !text.trim_start().starts_with('{') {
        return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => NotObject::Shape(None),
            Err(e) => NotObject::Json(e),
        });
    }
    serde_json::from_str::<T>(text).map_err(|e| {
        if e.classify() != serde_json::error::Category::Data {
            return NotObject::Json(e);
        }
        // A struct of borrowed raw values takes any value of any field: the
        // one data error left is a key given twice.
        let repeated = e
            .to_string()
            .strip_prefix("duplicate field `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(key, _)| format!("{prefix}{key}"));
        NotObject::Shape(repeated)
    })
}

fn string_field(
    name: impl Display + Copy,
    raw: Option<&RawValue>,
    allow_empty: bool,
) -> Result<String, Invalid> {
    let raw = raw.ok_or_else(|| Invalid(format!("field `{name}` is required")))?;
    // Told apart by the first character, so that no value of another type is
    // read (a deeply nested array would break serde_json's recursion limit).
    let kind = match raw.get().as_bytes().first() {
        Some(b'"') => {
            // Valid JSON, but not every JSON string is a string: a lone
            // surrogate (`"\ud800"`) is refused here.
            let s: String = serde_json::from_str(raw.get())
                .map_err(|e| Invalid(format!("field `{name}` is not a valid string: {e}")))?;
            if s.is_empty() && !allow_empty {
                return Err(Invalid(format!("field `{name}` must not be empty")));
            }
            return Ok(s);
        }
        Some(b'n') => return Err(Invalid(format!("field `{name}` is required"))),
        Some(b't' | b'f') => "a boolean",
        Some(b'[') => "an array",
        Some(b'{') => "an object",
        _ => "a number",
    };
    Err(Invalid(format!(
        "field `{name}` must be a string, not {kind}"
    )))
}

/// Deepest nesting of arrays and objects accepted in a payload: serde_json's
/// own default limit, so that receivers reading with it can read what the
/// relay passes on.
pub const MAX_DEPTH: usize = 128;

/// How deeply arrays and objects nest in `json`, which is valid JSON.
fn depth(json: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in json.as_bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth -= 1,
            _ => {}
        }
    }
    deepest
}

/// A payload as read: `None` when absent. Where the field is read with
/// [`present`], `null` is a payload like any other JSON value; a client's
/// `null` reads as absent.
fn payload_field(
    name: impl Display + Copy,
    raw: Option<&RawValue>,
) -> Result<Option<Box<RawValue>>, Invalid> {
    match raw {
        Some(raw) => {
            if depth(raw.get()) > MAX_DEPTH {
                return Err(Invalid(format!(
                    "field `{name}` is nested deeper than {MAX_DEPTH} levels"
                )));
            }
            Ok(Some(raw.to_owned()))
        }
        None => Ok(None),
    }
}

/// A payload that must be there.
fn required_payload(
    name: impl Display + Copy,
    raw: Option<&RawValue>,
) -> Result<Box<RawValue>, Invalid> {
    payload_field(name, raw)?.ok_or_else(|| Invalid(format!("field `{name}` is required")))
}

impl ClientMessage {
    pub fn parse(body: &[u8]) -> Result<Self, Invalid> {
        let b: ClientBody = object(body)?;
        let user_id = string_field("userId", b.user_id, false)?;
        let message_id = string_field("messageId", b.message_id, false)?;
        let conversation_id = string_field("conversationId", b.conversation_id, false)?;
        let kind = string_field("type", b.kind, false)?;
        let text = string_field("text", b.text, true)?;
        // As the reference does: a message without payload (or with a null
        // one, which serde reads as absent) carries its text.
        let payload = payload_field("payload", b.payload)?.unwrap_or_else(|| {
            RawValue::from_string(json!({ "text": text }).to_string()).expect("JSON")
        });
        Ok(Self {
            user_id,
            message_id,
            conversation_id,
            kind,
            text,
            payload,
        })
    }
}

/// `POST /v1/bot/messages`.
#[derive(Debug, Clone)]
pub struct BotMessage {
    pub conversation_id: String,
    pub kind: String,
    pub payload: Box<RawValue>,
}

#[derive(Deserialize)]
struct BotBody<'a> {
    #[serde(rename = "conversationId", borrow, default)]
    conversation_id: Option<&'a RawValue>,
    #[serde(rename = "type", borrow, default)]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
}

/// A field that is there, `null` included (serde reads a `null` into an
/// `Option` as `None`, the same as an absent field).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

impl BotMessage {
    pub fn parse(body: &[u8]) -> Result<Self, Invalid> {
        let b: BotBody = object(body)?;
        Ok(Self {
            conversation_id: string_field("conversationId", b.conversation_id, false)?,
            kind: string_field("type", b.kind, false)?,
            payload: required_payload("payload", b.payload)?,
        })
    }
}

/// One reply in a bot's synchronous answer: `{"responses": [{"type", "payload"}, ...]}`.
#[derive(Debug, Clone)]
pub struct BotReply {
    pub kind: String,
    pub payload: Box<RawValue>,
}

#[derive(Deserialize)]
struct SyncAnswer<'a> {
    #[serde(borrow, default)]
    responses: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ReplyBody<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
}

/// Reads the replies from a bot's 2xx answer. An empty body means no replies.
pub fn parse_sync_replies(body: &[u8]) -> Result<Vec<BotReply>, Invalid> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let answer: SyncAnswer = object(body)?;
    let Some(responses) = answer.responses else {
        return Ok(Vec::new());
    };
    if !responses.get().starts_with('[') {
        return Err(Invalid("field `responses` must be an array".into()));
    }
    let responses: Vec<&RawValue> =
        serde_json::from_str(responses.get()).expect("a JSON array holds JSON values");
    let mut replies = Vec::with_capacity(responses.len());
    for (i, raw) in responses.into_iter().enumerate() {
        let reply: ReplyBody =
            object_at(raw.get(), format_args!("responses[{i}].")).map_err(|e| match e {
                NotObject::Shape(Some(field)) => twice(&field),
                _ => Invalid(format!("responses[{i}] must be an object")),
            })?;
        replies.push(BotReply {
            kind: string_field(format_args!("responses[{i}].type"), reply.kind, false)?,
            payload: required_payload(format_args!("responses[{i}].payload"), reply.payload)?,
        });
    }
    Ok(replies)
}

pub fn rfc3339(ms: u64) -> String {
    rfc3339_display(ms).to_string()
}

fn rfc3339_display(ms: u64) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms))
}

/// Room for a body made of `m`, with `more` bytes besides.
fn body_room(m: &InboundMessage, more: usize) -> usize {
    json::room(&m.strings(), m.payload.get().len() + more)
}

/// `"createdAt"` as the contracts write it: RFC 3339 with milliseconds, UTC.
fn created_at(o: &mut Obj<'_>, ms: u64) {
    o.display("createdAt", &rfc3339_display(ms));
}

/// The `200` answer to an accepted message; stored, and sent again to a duplicate.
pub fn accept_answer(m: &InboundMessage) -> String {
    // The relay's ids of the conversation and the user are in it twice.
    let mut out = Vec::with_capacity(body_room(m, m.conversation_id.len() + m.user_id.len()));
    let mut answer = Obj::new(&mut out);
    answer
        .obj("message", |o| {
            o.str("id", &m.id)
                .str("conversationId", &m.conversation_id)
                .str("userId", &m.user_id)
                .str("type", &m.kind)
                .raw("payload", &m.payload);
            created_at(o, m.created_at_ms);
            o.obj("tags", |t| {
                t.str("id", &m.caller_message_id);
            });
        })
        .obj("user", |o| {
            o.str("id", &m.user_id).obj("tags", |t| {
                t.str("id", &m.caller_user_id);
            });
        })
        .obj("conversation", |o| {
            o.str("id", &m.conversation_id).obj("tags", |t| {
                t.str("id", &m.caller_conversation_id);
            });
        });
    answer.end();
    String::from_utf8(out).expect("JSON written from strings is UTF-8")
}

/// What the bot receives for a user's message.
pub fn bot_request(m: &InboundMessage) -> Vec<u8> {
    let mut out = Vec::with_capacity(body_room(m, 0));
    let mut body = Obj::new(&mut out);
    body.str("id", &m.id)
        .str("conversationId", &m.conversation_id)
        .str("userId", &m.user_id)
        .str("type", &m.kind)
        .str("text", &m.text)
        .raw("payload", &m.payload);
    created_at(&mut body, m.created_at_ms);
    body.obj("tags", |t| {
        t.str("conversationId", &m.caller_conversation_id)
            .str("userId", &m.caller_user_id)
            .str("messageId", &m.caller_message_id);
    });
    body.end();
    out
}

/// What the response endpoint receives for one bot message.
pub fn response_request(m: &OutboundMessage) -> Vec<u8> {
    let mut out = Vec::with_capacity(json::room(&m.strings(), m.payload.get().len()));
    let mut body = Obj::new(&mut out);
    body.str("type", &m.kind)
        .raw("payload", &m.payload)
        .str("conversationId", &m.caller_conversation_id)
        .str("botpressUserId", &m.user_id)
        .str("botpressMessageId", &m.id)
        .str("botpressConversationId", &m.conversation_id);
    body.end();
    out
}

/// `{"error": {"code", "message"}}`.
pub fn error_body(code: &str, message: &str) -> String {
    json!({ "error": { "code": code, "message": message } }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> String {
        ClientMessage::parse(body.as_bytes()).unwrap_err().0
    }

    #[test]
    fn a_complete_message_parses_and_payload_defaults_to_the_text() {
        let m = ClientMessage::parse(
            br#"{"userId":"u","messageId":"m","conversationId":"c","type":"text","text":"hi"}"#,
        )
        .unwrap();
        assert_eq!(
            (m.user_id.as_str(), m.kind.as_str(), m.text.as_str()),
            ("u", "text", "hi")
        );
        assert_eq!(m.payload.get(), r#"{"text":"hi"}"#);
        let m = ClientMessage::parse(
            br#"{"userId":"u","messageId":"m","conversationId":"c","type":"image","text":"","payload":{"url":"x"},"extra":1}"#,
        )
        .unwrap();
        assert_eq!(m.payload.get(), r#"{"url":"x"}"#);
    }

    #[test]
    fn each_broken_rule_names_its_field() {
        let base = r#""messageId":"m","conversationId":"c","type":"text","text":"hi""#;
        assert_eq!(err(&format!("{{{base}}}")), "field `userId` is required");
        assert_eq!(
            err(&format!(r#"{{"userId":"",{base}}}"#)),
            "field `userId` must not be empty"
        );
        assert_eq!(
            err(&format!(r#"{{"userId":7,{base}}}"#)),
            "field `userId` must be a string, not a number"
        );
        assert_eq!(
            err(r#"{"userId":"u","messageId":"m","conversationId":"c","type":"text"}"#),
            "field `text` is required"
        );
        assert_eq!(
            err(r#"{"userId":"u","messageId":["m"],"conversationId":"c","type":"text","text":""}"#),
            "field `messageId` must be a string, not an array"
        );
    }

    #[test]
    fn bodies_that_are_not_json_objects_are_refused_clearly() {
        assert_eq!(err("[1,2]"), "body must be a JSON object");
        assert_eq!(err("\"x\""), "body must be a JSON object");
        assert_eq!(err(""), "body is empty; expected a JSON object");
        assert!(err("{\"userId\":").starts_with("body is not valid JSON"));
        assert!(
            ClientMessage::parse(b"{\"userId\":\"\xff\"}")
                .unwrap_err()
                .0
                .contains("UTF-8")
        );
        let deep = "[".repeat(100_000);
        assert!(err(&format!("{{\"payload\":{deep}")).starts_with("body is not valid JSON"));
    }

    #[test]
    fn deeply_nested_values_are_refused_by_name() {
        let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let message = |field: &str, value: &str| {
            let mut body: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
                r#"{"userId":"u","messageId":"m","conversationId":"c","type":"text","text":"hi"}"#,
            )
            .unwrap();
            body.remove(field);
            let mut text = serde_json::to_string(&body).unwrap();
            text.pop();
            format!("{text},\"{field}\":{value}}}")
        };
        let deep = nested(MAX_DEPTH + 1);
        assert_eq!(
            err(&message("payload", &deep)),
            format!("field `payload` is nested deeper than {MAX_DEPTH} levels")
        );
        assert!(
            ClientMessage::parse(message("payload", &nested(MAX_DEPTH)).as_bytes()).is_ok(),
            "{MAX_DEPTH} levels are fine"
        );
        // Brackets inside strings do not count.
        let quoted = format!("{{\"a\":\"{}\"}}", "[".repeat(1000));
        assert!(ClientMessage::parse(message("payload", &quoted).as_bytes()).is_ok());
        // Far past serde_json's own recursion limit, in a field read as a string.
        for field in ["userId", "text"] {
            assert_eq!(
                err(&message(field, &nested(100_000))),
                format!("field `{field}` must be a string, not an array")
            );
        }
        let bot = format!(r#"{{"conversationId":"c","type":"text","payload":{deep}}}"#);
        assert_eq!(
            BotMessage::parse(bot.as_bytes()).unwrap_err().0,
            format!("field `payload` is nested deeper than {MAX_DEPTH} levels")
        );
        let replies = format!(r#"{{"responses":[{{"type":"text","payload":{deep}}}]}}"#);
        assert_eq!(
            parse_sync_replies(replies.as_bytes()).unwrap_err().0,
            format!("field `responses[0].payload` is nested deeper than {MAX_DEPTH} levels")
        );
    }

    #[test]
    fn sync_replies_are_read_and_checked() {
        assert!(parse_sync_replies(b"").unwrap().is_empty());
        assert!(parse_sync_replies(b"{}").unwrap().is_empty());
        let r = parse_sync_replies(br#"{"responses":[{"type":"text","payload":{"text":"a"}},{"type":"image","payload":{"u":1}}]}"#).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].kind, "image");
        assert_eq!(
            parse_sync_replies(br#"{"responses":[{"payload":{}}]}"#)
                .unwrap_err()
                .0,
            "field `responses[0].type` is required"
        );
    }

    #[test]
    fn a_null_payload_is_a_payload_from_a_bot_and_absent_from_a_client() {
        // A client's null payload reads as absent: the text, as the reference does.
        let m = ClientMessage::parse(
            br#"{"userId":"u","messageId":"m","conversationId":"c","type":"text","text":"hi","payload":null}"#,
        )
        .unwrap();
        assert_eq!(m.payload.get(), r#"{"text":"hi"}"#);
        // A bot's is any JSON, null included; only a missing one is refused.
        let b = BotMessage::parse(br#"{"conversationId":"c","type":"t","payload":null}"#).unwrap();
        assert_eq!(b.payload.get(), "null");
        assert_eq!(
            BotMessage::parse(br#"{"conversationId":"c","type":"t"}"#)
                .unwrap_err()
                .0,
            "field `payload` is required"
        );
        // One reply's null payload does not make the others unreadable.
        let r = parse_sync_replies(
            br#"{"responses":[{"type":"a","payload":null},{"type":"b","payload":{"x":1}}]}"#,
        )
        .unwrap();
        let read: Vec<_> = r
            .iter()
            .map(|r| (r.kind.as_str(), r.payload.get()))
            .collect();
        assert_eq!(read, [("a", "null"), ("b", r#"{"x":1}"#)]);
    }

    #[test]
    fn a_field_given_twice_is_named() {
        assert_eq!(
            err(
                r#"{"userId":"u","messageId":"m","conversationId":"c","type":"text","text":"a","text":"b"}"#
            ),
            "field `text` appears more than once"
        );
        assert_eq!(
            BotMessage::parse(
                br#"{"conversationId":"c","conversationId":"d","type":"t","payload":1}"#
            )
            .unwrap_err()
            .0,
            "field `conversationId` appears more than once"
        );
        let reply = |body: &str| parse_sync_replies(body.as_bytes()).unwrap_err().0;
        assert_eq!(
            reply(
                r#"{"responses":[{"type":"a","payload":1},{"type":"a","type":"b","payload":1}]}"#
            ),
            "field `responses[1].type` appears more than once"
        );
        assert_eq!(
            reply(r#"{"responses":[],"responses":[]}"#),
            "field `responses` appears more than once"
        );
        // Keys inside a payload are the payload's own business: passed on as sent.
        let b = BotMessage::parse(br#"{"conversationId":"c","type":"t","payload":{"k":1,"k":2}}"#)
            .unwrap();
        assert_eq!(b.payload.get(), r#"{"k":1,"k":2}"#);
    }

    #[test]
    fn replies_of_the_wrong_shape_are_named() {
        let reply = |body: &str| parse_sync_replies(body.as_bytes()).unwrap_err().0;
        assert_eq!(
            reply(r#"{"responses":{"type":"a","payload":1}}"#),
            "field `responses` must be an array"
        );
        // An array is not read as a reply field by field.
        assert_eq!(
            reply(r#"{"responses":[["a",{}]]}"#),
            "responses[0] must be an object"
        );
        assert_eq!(
            reply(r#"{"responses":[7]}"#),
            "responses[0] must be an object"
        );
        assert!(
            parse_sync_replies(br#"{"responses":null}"#)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_lone_surrogate_in_a_string_field_is_refused_not_a_panic() {
        let fields = ["userId", "messageId", "conversationId", "type", "text"];
        for field in fields {
            let body: String = fields
                .iter()
                .map(|f| {
                    let value = if *f == field {
                        r#""a\ud800b""#
                    } else {
                        r#""x""#
                    };
                    format!(r#""{f}":{value}"#)
                })
                .collect::<Vec<_>>()
                .join(",");
            let problem = err(&format!("{{{body}}}"));
            assert!(
                problem.starts_with(&format!("field `{field}` is not a valid string")),
                "{problem}"
            );
        }
        // A surrogate pair is a character, and is taken.
        let m = ClientMessage::parse(
            br#"{"userId":"u","messageId":"m","conversationId":"c","type":"text","text":"\ud83d\ude00"}"#,
        )
        .unwrap();
        assert_eq!(m.text, "\u{1f600}");
        // The bot's replies and posts are read the same way.
        assert!(parse_sync_replies(br#"{"responses":[{"type":"\udc00","payload":{}}]}"#).is_err());
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(1_614_265_330_123), "2021-02-25T15:02:10.123Z");
    }

    fn message(odd: &str) -> InboundMessage {
        InboundMessage {
            id: format!("id{odd}"),
            conversation_id: format!("conv{odd}"),
            user_id: format!("user{odd}"),
            caller_conversation_id: format!("c{odd}"),
            caller_user_id: format!("u{odd}"),
            caller_message_id: format!("m{odd}"),
            kind: "text".into(),
            text: format!("hi{odd}"),
            payload: RawValue::from_string(r#"{"text":"hi","n":[1]}"#.into()).unwrap(),
            created_at_ms: 1_614_265_330_123,
            queued_at_ms: 1,
            trace: None,
            waited: false,
        }
    }

    #[test]
    fn the_bodies_sent_are_written_field_by_field_in_the_contracts_order() {
        let m = message("");
        assert_eq!(
            String::from_utf8(bot_request(&m)).unwrap(),
            r#"{"id":"id","conversationId":"conv","userId":"user","type":"text","text":"hi","payload":{"text":"hi","n":[1]},"createdAt":"2021-02-25T15:02:10.123Z","tags":{"conversationId":"c","userId":"u","messageId":"m"}}"#
        );
        assert_eq!(
            accept_answer(&m),
            r#"{"message":{"id":"id","conversationId":"conv","userId":"user","type":"text","payload":{"text":"hi","n":[1]},"createdAt":"2021-02-25T15:02:10.123Z","tags":{"id":"m"}},"user":{"id":"user","tags":{"id":"u"}},"conversation":{"id":"conv","tags":{"id":"c"}}}"#
        );
        let reply = OutboundMessage {
            id: "r".into(),
            conversation_id: "conv".into(),
            caller_conversation_id: "c".into(),
            user_id: "user".into(),
            kind: "image".into(),
            payload: RawValue::from_string(r#"{"url":"x"}"#.into()).unwrap(),
            created_at_ms: 1,
            queued_at_ms: 1,
            trace: None,
        };
        assert_eq!(
            String::from_utf8(response_request(&reply)).unwrap(),
            r#"{"type":"image","payload":{"url":"x"},"conversationId":"c","botpressUserId":"user","botpressMessageId":"r","botpressConversationId":"conv"}"#
        );
    }

    #[test]
    fn strings_in_the_bodies_sent_are_escaped() {
        let odd = "\"q\" \\ \n\t\u{1} é😀";
        let m = message(odd);
        let body: serde_json::Value = serde_json::from_slice(&bot_request(&m)).unwrap();
        assert_eq!(body["id"], format!("id{odd}"));
        assert_eq!(body["text"], format!("hi{odd}"));
        assert_eq!(body["tags"]["messageId"], format!("m{odd}"));
        let answer: serde_json::Value = serde_json::from_str(&accept_answer(&m)).unwrap();
        assert_eq!(answer["conversation"]["tags"]["id"], format!("c{odd}"));
        assert_eq!(answer["user"]["id"], format!("user{odd}"));
    }
}

/// Random and mutated bodies against the parsers: whatever comes in, the
/// answer is a value or a named error, never a panic, and an accepted message
/// satisfies the contract's rules.
#[cfg(test)]
mod fuzz {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const SEED_BODIES: &[&str] = &[
        r#"{"userId":"u","messageId":"m","conversationId":"c","type":"text","text":"hi","payload":{"a":[1,2,{"b":null}]}}"#,
        r#"{"conversationId":"c","type":"text","payload":{"text":"x"}}"#,
        r#"{"responses":[{"type":"text","payload":{"text":"a"}},{"type":"image","payload":"x"}]}"#,
    ];

    fn mutate(rng: &mut StdRng, body: &[u8]) -> Vec<u8> {
        let mut out = body.to_vec();
        for _ in 0..rng.random_range(1..6) {
            let at = rng.random_range(0..=out.len());
            match rng.random_range(0..5) {
                0 if !out.is_empty() => {
                    out.remove(at.min(out.len() - 1));
                }
                1 => out.insert(at, rng.random()),
                2 => {
                    let structural = b"{}[]\",:\\0e-";
                    out.insert(at, structural[rng.random_range(0..structural.len())]);
                }
                3 => out.truncate(at),
                _ => {
                    let start = rng.random_range(0..=out.len());
                    let end = rng.random_range(start..=out.len());
                    let piece = out[start..end].to_vec();
                    out.splice(at.min(out.len())..at.min(out.len()), piece);
                }
            }
        }
        out
    }

    /// A JSON value of any type, some nested far deeper than serde_json reads.
    fn value(rng: &mut StdRng) -> String {
        let depth = rng.random_range(1..300);
        match rng.random_range(0..8) {
            0 => "null".into(),
            1 => "true".into(),
            2 => "-1.5e3".into(),
            3 => "\"\"".into(),
            4 => format!("\"{}\"", "[{\\\"".repeat(rng.random_range(1..4))),
            5 => format!("{}{}", "[".repeat(depth), "]".repeat(depth)),
            6 => format!("{}1{}", "{\"k\":".repeat(depth), "}".repeat(depth)),
            _ => "\"x\"".into(),
        }
    }

    #[test]
    fn structured_bodies_of_every_type_and_depth_are_read_without_panic() {
        let mut rng = StdRng::seed_from_u64(0xdee9);
        let fields = [
            "userId",
            "messageId",
            "conversationId",
            "type",
            "text",
            "payload",
            "responses",
        ];
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..3_000 {
            let mut members = Vec::new();
            for field in fields {
                match rng.random_range(0..4) {
                    0 => {}
                    1 if field == "responses" => members.push(format!(
                        "\"responses\":[{{\"type\":{},\"payload\":{}}}]",
                        value(&mut rng),
                        value(&mut rng)
                    )),
                    1 | 2 => members.push(format!("\"{field}\":\"v\"")),
                    _ => members.push(format!("\"{field}\":{}", value(&mut rng))),
                }
            }
            let body = format!("{{{}}}", members.join(","));
            match ClientMessage::parse(body.as_bytes()) {
                Ok(m) => {
                    accepted += 1;
                    assert!(depth(m.payload.get()) <= MAX_DEPTH);
                }
                Err(Invalid(message)) => {
                    refused += 1;
                    assert!(message.starts_with("field `"), "{message}: {body}");
                }
            }
            if let Ok(m) = BotMessage::parse(body.as_bytes()) {
                assert!(depth(m.payload.get()) <= MAX_DEPTH);
            }
            if let Ok(replies) = parse_sync_replies(body.as_bytes()) {
                assert!(replies.iter().all(|r| depth(r.payload.get()) <= MAX_DEPTH));
            }
        }
        assert!(accepted > 100 && refused > 100, "{accepted} {refused}");
    }

    #[test]
    fn parsers_never_panic_and_accept_only_valid_messages() {
        let mut rng = StdRng::seed_from_u64(0x0b07_7e1a);
        let mut accepted = 0;
        for i in 0..30_000 {
            let body = if i % 10 == 0 {
                (0..rng.random_range(0..64)).map(|_| rng.random()).collect()
            } else {
                mutate(&mut rng, SEED_BODIES[i % SEED_BODIES.len()].as_bytes())
            };
            match ClientMessage::parse(&body) {
                Ok(m) => {
                    accepted += 1;
                    assert!(!m.user_id.is_empty() && !m.message_id.is_empty());
                    assert!(!m.conversation_id.is_empty() && !m.kind.is_empty());
                    serde_json::from_str::<serde_json::Value>(m.payload.get())
                        .expect("payload is JSON");
                }
                Err(Invalid(message)) => assert!(!message.is_empty()),
            }
            if let Err(Invalid(message)) = BotMessage::parse(&body) {
                assert!(!message.is_empty());
            }
            if let Ok(replies) = parse_sync_replies(&body) {
                assert!(replies.iter().all(|r| !r.kind.is_empty()));
            }
        }
        assert!(
            accepted > 0,
            "some mutations stay valid, so the accepting path is exercised too"
        );
    }
}
