//! The JSON-lines protocol of `edgemoe serve`, mirroring OpenAI's completions schema: parsing
//! and validating input lines, and building the output objects.

use crate::engine::generation::{FinishReason, GenerateOutput, GenerateRequest};
use crate::engine::sampling::SamplingParams;
use serde_json::{json, Map, Value};

/// Longest prompt accepted, in bytes, before tokenizing (the token limit is checked after).
pub const MAX_PROMPT_BYTES: usize = 1 << 20;
/// OpenAI allows at most four stop sequences.
pub const MAX_STOP: usize = 4;

/// One parsed input line.
#[derive(Debug)]
pub enum Incoming {
    Request {
        id: String,
        stream: bool,
        req: GenerateRequest,
    },
    Cancel {
        id: String,
    },
    Stats,
    /// Changes the memory budget (`--mem`) to `bytes` while requests run.
    SetMem {
        bytes: u64,
    },
}

/// An input line we refuse, with the id when we could read one.
#[derive(Debug, PartialEq)]
pub struct BadLine {
    pub id: Option<String>,
    pub message: String,
    pub kind: &'static str,
    pub code: &'static str,
}

impl BadLine {
    fn new(id: Option<String>, code: &'static str, message: impl Into<String>) -> BadLine {
        BadLine {
            id,
            message: message.into(),
            kind: "invalid_request_error",
            code,
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "error": {"message": self.message, "type": self.kind, "code": self.code}
        })
    }
}

/// Parses one line (already checked to be UTF-8); `next_id` names requests that carry no id.
pub fn parse_line(line: &str, next_id: impl FnOnce() -> String) -> Result<Incoming, BadLine> {
    let value: Value = serde_json::from_str(line)
        .map_err(|e| BadLine::new(None, "invalid_json", format!("malformed JSON: {e}")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| BadLine::new(None, "invalid_json", "a request must be a JSON object"))?;
    if let Some(c) = obj.get("cancel") {
        return match c.as_str() {
            Some(id) => Ok(Incoming::Cancel { id: id.to_string() }),
            None => Err(BadLine::new(
                None,
                "invalid_type",
                "`cancel` must be a request id string",
            )),
        };
    }
    if let Some(op) = obj.get("op") {
        return match op.as_str() {
            Some("stats") => Ok(Incoming::Stats),
            Some("set_mem") => match obj.get("bytes").and_then(Value::as_u64) {
                Some(bytes) => Ok(Incoming::SetMem { bytes }),
                None => Err(BadLine::new(
                    None,
                    "invalid_type",
                    "`set_mem` needs `bytes`, a non-negative integer",
                )),
            },
            _ => Err(BadLine::new(None, "unknown_op", format!("unknown op {op}"))),
        };
    }
    let id = match obj.get("id") {
        None | Some(Value::Null) => next_id(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(BadLine::new(
                None,
                "invalid_type",
                format!("`id` must be a string, got {other}"),
            ))
        }
    };
    parse_request(obj, &id).map_err(|(code, message)| BadLine::new(Some(id.clone()), code, message))
}

type FieldError = (&'static str, String);

fn parse_request(obj: &Map<String, Value>, id: &str) -> Result<Incoming, FieldError> {
    let prompt = match obj.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err((
                "invalid_type",
                format!("`prompt` must be a string, got {}", type_name(other)),
            ))
        }
        None => return Err(("missing_field", "`prompt` is required".into())),
    };
    if prompt.is_empty() {
        return Err(("empty_prompt", "`prompt` is empty".into()));
    }
    if prompt.len() > MAX_PROMPT_BYTES {
        return Err((
            "context_length_exceeded",
            format!(
                "`prompt` is {} bytes, over the {MAX_PROMPT_BYTES}-byte limit",
                prompt.len()
            ),
        ));
    }
    // OpenAI's completions defaults: 16 tokens, temperature 1, top_p 1.
    let max_tokens = usize::try_from(uint(obj, "max_tokens", 16)?).unwrap_or(usize::MAX);
    let temperature = number(obj, "temperature", 1.0)?;
    if !(0.0..=2.0).contains(&temperature) {
        return Err((
            "invalid_value",
            format!("`temperature` must be in [0, 2], got {temperature}"),
        ));
    }
    let top_p = number(obj, "top_p", 1.0)?;
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err((
            "invalid_value",
            format!("`top_p` must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = uint(obj, "top_k", 0)? as usize;
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => fresh_seed(),
        Some(_) => uint(obj, "seed", 0)?,
    };
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err((
                "invalid_type",
                format!("`stream` must be a boolean, got {}", type_name(other)),
            ))
        }
    };
    let stop = match obj.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or((
                "invalid_type",
                "`stop` must be a string or a list of strings".to_string(),
            ))?,
        Some(other) => {
            return Err((
                "invalid_type",
                format!(
                    "`stop` must be a string or a list of strings, got {}",
                    type_name(other)
                ),
            ))
        }
    };
    if stop.len() > MAX_STOP {
        return Err((
            "invalid_value",
            format!("at most {MAX_STOP} stop sequences"),
        ));
    }
    Ok(Incoming::Request {
        id: id.to_string(),
        stream,
        req: GenerateRequest {
            prompt,
            max_tokens,
            sampling: SamplingParams {
                temperature: temperature as f32,
                top_k,
                top_p: top_p as f32,
                seed,
            },
            stop,
        },
    })
}

/// A seed for requests that bring none: different for every request, as OpenAI's sampling is.
fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut rng = crate::util::rng::SplitMix64::new(
        nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(32),
    );
    rng.next_u64()
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn uint(obj: &Map<String, Value>, field: &'static str, default: u64) -> Result<u64, FieldError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_u64().ok_or_else(|| {
            (
                "invalid_type",
                format!("`{field}` must be a non-negative integer, got {v}"),
            )
        }),
    }
}

fn number(obj: &Map<String, Value>, field: &'static str, default: f64) -> Result<f64, FieldError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_f64().ok_or_else(|| {
            (
                "invalid_type",
                format!("`{field}` must be a number, got {v}"),
            )
        }),
    }
}

pub fn chunk(id: &str, text: &str) -> Value {
    json!({
        "id": id,
        "object": "text_completion.chunk",
        "choices": [{"index": 0, "text": text, "finish_reason": null}]
    })
}

/// The last line of a request: the final chunk (streaming) or the whole completion.
pub fn completion(id: &str, model: &str, stream: bool, out: &GenerateOutput) -> Value {
    let (object, text) = if stream {
        ("text_completion.chunk", "")
    } else {
        ("text_completion", out.text.as_str())
    };
    json!({
        "id": id,
        "object": object,
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_name(out.finish_reason)}],
        "usage": {
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens
        },
        "timings": {"prompt_ms": out.prefill_ms, "tokens_per_s": out.decode_tokens_per_s}
    })
}

fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "cancelled",
        FinishReason::Error => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Incoming, BadLine> {
        parse_line(line, || "auto-1".into())
    }

    #[test]
    fn request_defaults_follow_openai() {
        match parse(r#"{"prompt":"hi"}"#).unwrap() {
            Incoming::Request { id, stream, req } => {
                assert_eq!(id, "auto-1");
                assert!(!stream);
                assert_eq!(req.max_tokens, 16);
                assert_eq!(req.sampling.temperature, 1.0);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_lines_get_codes_and_ids() {
        assert_eq!(parse("{oops").unwrap_err().code, "invalid_json");
        let e = parse(r#"{"id":"a","prompt":5}"#).unwrap_err();
        assert_eq!((e.id.as_deref(), e.code), (Some("a"), "invalid_type"));
        assert_eq!(
            parse(r#"{"id":"b","prompt":""}"#).unwrap_err().code,
            "empty_prompt"
        );
        assert_eq!(
            parse(r#"{"id":"c","prompt":"x","max_tokens":-1}"#)
                .unwrap_err()
                .code,
            "invalid_type"
        );
        assert_eq!(
            parse(r#"{"id":"d","prompt":"x","stop":[1]}"#)
                .unwrap_err()
                .code,
            "invalid_type"
        );
        assert_eq!(parse(r#"[1,2]"#).unwrap_err().code, "invalid_json");
        assert!(matches!(
            parse(r#"{"cancel":"r1"}"#),
            Ok(Incoming::Cancel { .. })
        ));
        assert!(matches!(parse(r#"{"op":"stats"}"#), Ok(Incoming::Stats)));
    }
}
