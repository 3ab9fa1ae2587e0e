//! Reading usage from the providers' answers, without I/O: a whole JSON body, or a stream of
//! server-sent events fed as it arrives.
//!
//! - OpenAI Chat Completions: `usage.prompt_tokens` (cached included:
//!   `prompt_tokens_details.cached_tokens`), `completion_tokens`; streamed, only when the
//!   request asked with `stream_options.include_usage`, in a last chunk with no choices.
//! - OpenAI Responses: `usage.input_tokens` (`input_tokens_details.cached_tokens`),
//!   `output_tokens`; streamed, in the `response.completed` event.
//! - Anthropic Messages: `usage.input_tokens` counts only uncached input, so the cache's reads
//!   and writes are added to it; streamed, input in `message_start`, the output so far in
//!   each `message_delta`.

use std::collections::BTreeMap;

use agentd_core::Usage;
use serde_json::Value;
use serde_json::value::RawValue;

use super::providers::Kind;

/// What the gateway needs of a request body.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RequestInfo {
    pub model: String,
    pub stream: bool,
    /// The most output it asked for (`max_tokens`, `max_completion_tokens`,
    /// `max_output_tokens`), if it said.
    pub max_output: Option<u64>,
    /// Choices asked for (`n`), each with that much output.
    pub choices: u64,
    /// A Responses request run in the background (its usage never comes back on it).
    pub background: bool,
}

/// What the gateway needs of a request body (read once), and for a streamed Chat
/// Completions request that did not ask for usage, the body asking for it.
pub fn inspect(kind: Kind, path: &str, body: &[u8]) -> (RequestInfo, Option<Vec<u8>>) {
    // The top level only, each value kept as its text: a large body costs its size once,
    // not a tree of values.
    let Ok(mut fields) = serde_json::from_slice::<BTreeMap<String, Box<RawValue>>>(body) else {
        return (RequestInfo::default(), None);
    };
    let field = |name: &str| -> Value {
        fields
            .get(name)
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
            .unwrap_or(Value::Null)
    };
    let info = RequestInfo {
        model: field("model").as_str().unwrap_or_default().to_string(),
        stream: field("stream").as_bool().unwrap_or(false),
        max_output: ["max_tokens", "max_completion_tokens", "max_output_tokens"]
            .iter()
            .find_map(|name| field(name).as_u64()),
        choices: field("n").as_u64().unwrap_or(1).clamp(1, MAX_CHOICES),
        background: field("background").as_bool().unwrap_or(false),
    };
    let asked = ask_for_usage(kind, path, &info, field("stream_options"), &mut fields);
    (info, asked)
}

/// The most choices (`n`) a request's reservation counts.
const MAX_CHOICES: u64 = 128;
/// The most output tokens a request's reservation counts per choice.
const MAX_OUTPUT: u64 = 1 << 24;

/// Output reserved for a request that does not say its most.
pub const DEFAULT_MAX_OUTPUT: u64 = 4096;

/// The most a request can use, reserved against budgets before it is forwarded: its input
/// counted as a token per 4 bytes of the body (more than its text takes), and the output it
/// allows.
pub fn worst_case(body_len: usize, info: &RequestInfo) -> Usage {
    Usage {
        input_tokens: (body_len as u64).div_ceil(4),
        output_tokens: info
            .max_output
            .unwrap_or(DEFAULT_MAX_OUTPUT)
            .min(MAX_OUTPUT)
            * info.choices.max(1),
        requests: 1,
        ..Usage::default()
    }
}

/// A streamed Chat Completions request that did not ask for usage: the body asking for it,
/// so the gateway can count the tokens (and hide the answer from the client).
fn ask_for_usage(
    kind: Kind,
    path: &str,
    info: &RequestInfo,
    options: Value,
    fields: &mut BTreeMap<String, Box<RawValue>>,
) -> Option<Vec<u8>> {
    if kind != Kind::Openai || !path.ends_with("/chat/completions") || !info.stream {
        return None;
    }
    if options["include_usage"].as_bool() == Some(true) {
        return None;
    }
    // Whatever `stream_options` was (absent, null, an object without it), it asks for usage.
    let mut options = match options {
        Value::Object(options) => options,
        _ => serde_json::Map::new(),
    };
    options.insert("include_usage".into(), Value::Bool(true));
    let options = RawValue::from_string(Value::Object(options).to_string()).ok()?;
    fields.insert("stream_options".into(), options);
    serde_json::to_vec(fields).ok()
}

fn count(value: &Value) -> u64 {
    value.as_u64().unwrap_or(0)
}

/// The usage object of any of the three APIs, as input (cached included), output, cached.
fn parse_usage(kind: Kind, usage: &Value) -> Option<Usage> {
    if !usage.is_object() {
        return None;
    }
    let (input, output, cached) = match kind {
        Kind::Openai if usage.get("prompt_tokens").is_some() => (
            count(&usage["prompt_tokens"]),
            count(&usage["completion_tokens"]),
            count(&usage["prompt_tokens_details"]["cached_tokens"]),
        ),
        Kind::Openai => (
            count(&usage["input_tokens"]),
            count(&usage["output_tokens"]),
            count(&usage["input_tokens_details"]["cached_tokens"]),
        ),
        Kind::Anthropic => {
            let cached = count(&usage["cache_read_input_tokens"]);
            (
                count(&usage["input_tokens"])
                    + cached
                    + count(&usage["cache_creation_input_tokens"]),
                count(&usage["output_tokens"]),
                cached,
            )
        }
    };
    Some(Usage {
        input_tokens: input,
        output_tokens: output,
        cached_input_tokens: cached,
        ..Usage::default()
    })
}

/// The model and usage of a whole (not streamed) answer.
pub fn from_body(kind: Kind, body: &[u8]) -> Option<(String, Usage)> {
    let value = serde_json::from_slice::<Value>(body).ok()?;
    let usage = parse_usage(kind, &value["usage"])?;
    Some((
        value["model"].as_str().unwrap_or_default().to_string(),
        usage,
    ))
}

/// Follows a stream of server-sent events as it passes: reads usage from it and, where the
/// gateway asked for usage the client did not, removes what the client would not have seen.
pub struct EventStream {
    kind: Kind,
    /// The gateway added `include_usage`: drop the usage chunk and the `"usage":null` fields.
    hide_usage: bool,
    pending: Vec<u8>,
    pub model: String,
    pub usage: Option<Usage>,
}

impl EventStream {
    pub fn new(kind: Kind, hide_usage: bool) -> EventStream {
        EventStream {
            kind,
            hide_usage,
            pending: Vec::new(),
            model: String::new(),
            usage: None,
        }
    }

    /// Takes the next bytes; returns those to pass on now: all of them at once, unless
    /// something is hidden, when only whole events pass (the rest waits for its end).
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(bytes);
        let mut out = if self.hide_usage {
            Vec::new()
        } else {
            bytes.to_vec()
        };
        while let Some(end) = event_end(&self.pending) {
            let event: Vec<u8> = self.pending.drain(..end).collect();
            let kept = self.event(&event);
            if self.hide_usage {
                out.extend(kept.unwrap_or_default());
            }
        }
        out
    }

    /// At the end of the stream: an event with no blank line after it, read (and passed
    /// on, if it was held back).
    pub fn finish(&mut self) -> Vec<u8> {
        let rest = std::mem::take(&mut self.pending);
        if rest.is_empty() {
            return rest;
        }
        let kept = self.event(&rest);
        if self.hide_usage {
            kept.unwrap_or_default()
        } else {
            Vec::new()
        }
    }

    /// One event: read, and returned as the client should see it (`None`: not at all).
    fn event(&mut self, event: &[u8]) -> Option<Vec<u8>> {
        let text = String::from_utf8_lossy(event);
        let data: String = text
            .lines()
            .filter_map(|line| line.strip_prefix("data:"))
            .map(|data| data.strip_prefix(' ').unwrap_or(data))
            .collect::<Vec<_>>()
            .join("\n");
        let Ok(value) = serde_json::from_str::<Value>(&data) else {
            return Some(event.to_vec());
        };
        match self.kind {
            Kind::Openai if value["type"].as_str() == Some("response.completed") => {
                self.note_model(&value["response"]["model"]);
                self.usage = parse_usage(self.kind, &value["response"]["usage"]);
            }
            Kind::Openai => {
                self.note_model(&value["model"]);
                if let Some(usage) = parse_usage(self.kind, &value["usage"]) {
                    self.usage = Some(usage);
                    let no_choices = value["choices"].as_array().is_some_and(Vec::is_empty);
                    if self.hide_usage && no_choices {
                        return None;
                    }
                }
                if self.hide_usage {
                    return Some(text.replace(",\"usage\":null", "").into_bytes());
                }
            }
            Kind::Anthropic => match value["type"].as_str() {
                Some("message_start") => {
                    self.note_model(&value["message"]["model"]);
                    self.usage = parse_usage(self.kind, &value["message"]["usage"]);
                }
                Some("message_delta") => {
                    let output = count(&value["usage"]["output_tokens"]);
                    if let Some(usage) = &mut self.usage {
                        usage.output_tokens = output;
                    }
                }
                _ => {}
            },
        }
        Some(event.to_vec())
    }

    fn note_model(&mut self, model: &Value) {
        if self.model.is_empty()
            && let Some(model) = model.as_str()
        {
            self.model = model.to_string();
        }
    }
}

/// Where the first event in `bytes` ends (after its blank line), if it is whole.
fn event_end(bytes: &[u8]) -> Option<usize> {
    let lf = bytes.windows(2).position(|w| w == b"\n\n").map(|at| at + 2);
    let crlf = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_answers_of_the_three_apis() {
        let chat = br#"{"model":"gpt-4.1-mini","usage":{"prompt_tokens":12,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":4}}}"#;
        let responses = br#"{"model":"gpt-4.1","usage":{"input_tokens":7,"output_tokens":3,"input_tokens_details":{"cached_tokens":2}}}"#;
        let messages = br#"{"model":"claude","usage":{"input_tokens":10,"output_tokens":6,"cache_read_input_tokens":20,"cache_creation_input_tokens":5}}"#;
        let (model, usage) = from_body(Kind::Openai, chat).unwrap();
        assert_eq!(
            (
                model.as_str(),
                usage.input_tokens,
                usage.output_tokens,
                usage.cached_input_tokens
            ),
            ("gpt-4.1-mini", 12, 5, 4)
        );
        let (_, usage) = from_body(Kind::Openai, responses).unwrap();
        assert_eq!(
            (
                usage.input_tokens,
                usage.output_tokens,
                usage.cached_input_tokens
            ),
            (7, 3, 2)
        );
        let (_, usage) = from_body(Kind::Anthropic, messages).unwrap();
        assert_eq!(
            (
                usage.input_tokens,
                usage.output_tokens,
                usage.cached_input_tokens
            ),
            (35, 6, 20)
        );
        assert!(from_body(Kind::Openai, b"{\"error\":{}}").is_none());
    }

    #[test]
    fn usage_is_asked_for_only_where_the_client_did_not() {
        let asked = inspect(
            Kind::Openai,
            "/v1/chat/completions",
            br#"{"model":"m","stream":true}"#,
        )
        .1
        .unwrap();
        let asked: Value = serde_json::from_slice(&asked).unwrap();
        assert_eq!(asked["stream_options"]["include_usage"], Value::Bool(true));
        assert!(
            inspect(Kind::Openai, "/v1/chat/completions", br#"{"stream":false}"#)
                .1
                .is_none()
        );
        // Null, or an object without it: asked for all the same.
        for options in ["null", "{\"other\":1}", "7"] {
            let body = format!(r#"{{"stream":true,"stream_options":{options}}}"#);
            let asked = inspect(Kind::Openai, "/v1/chat/completions", body.as_bytes())
                .1
                .unwrap();
            let asked: Value = serde_json::from_slice(&asked).unwrap();
            assert_eq!(
                asked["stream_options"]["include_usage"],
                Value::Bool(true),
                "{body}"
            );
        }
        // n choices reserve n times the output.
        let (info, _) = inspect(
            Kind::Openai,
            "/v1/chat/completions",
            br#"{"n":3,"max_tokens":10}"#,
        );
        assert_eq!(worst_case(0, &info).output_tokens, 30);
        assert!(
            inspect(
                Kind::Openai,
                "/v1/chat/completions",
                br#"{"stream":true,"stream_options":{"include_usage":true}}"#
            )
            .1
            .is_none()
        );
        assert!(
            inspect(Kind::Openai, "/v1/responses", br#"{"stream":true}"#)
                .1
                .is_none()
        );
        assert!(
            inspect(Kind::Anthropic, "/v1/messages", br#"{"stream":true}"#)
                .1
                .is_none()
        );
    }

    #[test]
    fn a_chat_stream_split_anywhere_counts_and_hides_what_was_not_asked() {
        let stream = concat!(
            "data: {\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
            "data: {\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\n",
            "data: [DONE]\n\n"
        );
        for split in 1..stream.len() {
            let mut events = EventStream::new(Kind::Openai, true);
            let mut seen = events.feed(&stream.as_bytes()[..split]);
            seen.extend(events.feed(&stream.as_bytes()[split..]));
            seen.extend(events.finish());
            let seen = String::from_utf8(seen).unwrap();
            assert_eq!(
                seen,
                "data: {\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n"
            );
            let usage = events.usage.unwrap();
            assert_eq!((usage.input_tokens, usage.output_tokens), (9, 2));
            assert_eq!(events.model, "m");
        }
        // Asked for by the client: passed on as it is.
        let mut events = EventStream::new(Kind::Openai, false);
        let mut seen = events.feed(stream.as_bytes());
        seen.extend(events.finish());
        assert_eq!(seen, stream.as_bytes());
    }

    #[test]
    fn responses_and_messages_streams() {
        let responses = "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"model\":\"r\",\"usage\":{\"input_tokens\":4,\"output_tokens\":8}}}\n\n";
        let mut events = EventStream::new(Kind::Openai, false);
        assert_eq!(events.feed(responses.as_bytes()), responses.as_bytes());
        assert_eq!(events.usage.unwrap().output_tokens, 8);
        assert_eq!(events.model, "r");
        let messages = concat!(
            "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"c\",\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\r\n\r\n",
            "event: message_delta\r\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\r\n\r\n",
        );
        let mut events = EventStream::new(Kind::Anthropic, false);
        events.feed(messages.as_bytes());
        let usage = events.usage.unwrap();
        assert_eq!((usage.input_tokens, usage.output_tokens), (3, 15));
    }
}
