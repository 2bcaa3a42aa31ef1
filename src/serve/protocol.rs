//! The JSON-lines protocol of `edgemoe serve`, mirroring OpenAI's completions schema: parsing
//! and validating input lines, and building the output objects.

use crate::engine::generation::{FinishReason, GenerateOutput, GenerateRequest};
use crate::engine::penalties::Penalties;
use crate::engine::sampling::SamplingParams;
use serde_json::{json, Map, Value};

/// Longest prompt accepted, in bytes, before tokenizing (the token limit is checked after).
pub const MAX_PROMPT_BYTES: usize = 1 << 20;
/// Most choices one HTTP request may ask for (`n`).
pub const MAX_N: u64 = 16;
/// OpenAI allows at most four stop sequences.
pub const MAX_STOP: usize = 4;
/// Longest stop sequence, in bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// Which schema a request follows: it decides the fields allowed and the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// A `serve` input line: a completion (`prompt`) or a chat (`messages`), plus `id`.
    Lines,
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/chat/completions`.
    Chat,
}

/// What the model is to continue.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    /// Chat messages, each an object with a `role` and a string `content`, for the template.
    Messages(Vec<Value>),
}

/// A validated request, before tokenizing.
#[derive(Debug, Clone)]
pub struct Request {
    pub input: PromptInput,
    pub stream: bool,
    /// Put the prompt before the completion's text (completions only).
    pub echo: bool,
    /// `None`: up to the model's context (chat's default).
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// `stream_options.include_usage`: a last chunk with the token counts.
    pub include_usage: bool,
    pub penalties: Penalties,
    /// Choices to generate (HTTP only; choice i samples with seed + i).
    pub n: usize,
    /// The request's own KV budget and policy (`kv_budget`, `kv_policy`).
    pub kv: super::kv::RequestKv,
    /// Variables for the chat template (`chat_template_kwargs`, and `reasoning_effort` as
    /// GPT-OSS's template reads it): e.g. `{"enable_thinking": false}` for Qwen3 and GLM.
    pub template_vars: Box<Map<String, Value>>,
}

impl Request {
    /// The engine's request; `prompt` is the text to tokenize (the rendered chat for messages)
    /// and `max_tokens` already resolved.
    pub fn generate_request(&self, prompt: String, max_tokens: usize) -> GenerateRequest {
        GenerateRequest {
            prompt,
            max_tokens,
            sampling: self.sampling.clone(),
            stop: self.stop.clone(),
        }
    }
}

/// One parsed input line.
#[derive(Debug)]
pub enum Incoming {
    Request {
        id: String,
        req: Request,
    },
    Cancel {
        id: String,
    },
    Stats,
    /// Changes the memory budget (`--mem`) to `bytes` while requests run.
    SetMem {
        bytes: u64,
    },
    /// Changes the GPU expert tier's budget (`--gpu-mem`) to `bytes` while requests run.
    SetGpuMem {
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
    pub fn new(id: Option<String>, code: &'static str, message: impl Into<String>) -> BadLine {
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
        only_fields(obj, &["cancel"]).map_err(|(c, m)| BadLine::new(None, c, m))?;
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
        let allowed: &[&str] = match op.as_str() {
            Some("set_mem") | Some("set_gpu_mem") => &["op", "bytes"],
            _ => &["op"],
        };
        only_fields(obj, allowed).map_err(|(c, m)| BadLine::new(None, c, m))?;
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
            Some("set_gpu_mem") => match obj.get("bytes").and_then(Value::as_u64) {
                Some(bytes) => Ok(Incoming::SetGpuMem { bytes }),
                None => Err(BadLine::new(
                    None,
                    "invalid_type",
                    "`set_gpu_mem` needs `bytes`, a non-negative integer",
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
    match parse_request(obj, Api::Lines) {
        Ok(req) => Ok(Incoming::Request { id, req }),
        Err((code, message)) => Err(BadLine::new(Some(id), code, message)),
    }
}

/// A refused request: an error code and a message naming the field.
pub type FieldError = (&'static str, String);

/// Fields every completion request may carry (OpenAI's common ones and edgemoe's `top_k`).
const COMMON_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stream",
    "stream_options",
    "stop",
    "n",
    "logprobs",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_p",
    "logit_bias",
    "user",
    "kv_budget",
    "kv_policy",
];
const COMPLETION_FIELDS: &[&str] = &["prompt", "echo", "best_of", "suffix"];
const CHAT_FIELDS: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "response_format",
    "chat_template_kwargs",
    "reasoning_effort",
];

/// Refuses any field not in `allowed`, naming it (a misspelt `temperatur` must not silently
/// sample at the default temperature).
fn only_fields(obj: &Map<String, Value>, allowed: &[&str]) -> Result<(), FieldError> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err((
            "unknown_field",
            format!("unknown field `{k}` (allowed: {})", allowed.join(", ")),
        )),
        None => Ok(()),
    }
}

/// Validates a completion or chat request object.
pub fn parse_request(obj: &Map<String, Value>, api: Api) -> Result<Request, FieldError> {
    let mut allowed: Vec<&str> = COMMON_FIELDS.to_vec();
    match api {
        Api::Completions => allowed.extend(COMPLETION_FIELDS),
        Api::Chat => allowed.extend(CHAT_FIELDS),
        Api::Lines => {
            allowed.push("id");
            allowed.extend(COMPLETION_FIELDS);
            allowed.extend(CHAT_FIELDS);
        }
    }
    only_fields(obj, &allowed)?;
    refuse_unsupported(obj)?;
    let input = match (api, obj.get("prompt"), obj.get("messages")) {
        (_, Some(_), Some(_)) => {
            return Err((
                "invalid_value",
                "give `prompt` or `messages`, not both".into(),
            ))
        }
        (Api::Chat, _, None) => return Err(("missing_field", "`messages` is required".into())),
        (_, None, Some(m)) => PromptInput::Messages(messages(m)?),
        (_, Some(p), None) => PromptInput::Text(prompt(p)?),
        (_, None, None) => return Err(("missing_field", "`prompt` is required".into())),
    };
    let chat = matches!(input, PromptInput::Messages(_));
    let echo = bool_field(obj, "echo", false)?;
    if echo && chat {
        return Err(("invalid_value", "`echo` applies to completions only".into()));
    }
    let max_tokens = match (
        opt_uint(obj, "max_tokens")?,
        opt_uint(obj, "max_completion_tokens")?,
    ) {
        (Some(_), Some(_)) => {
            return Err((
                "invalid_value",
                "give `max_tokens` or `max_completion_tokens`, not both".into(),
            ))
        }
        (Some(n), None) | (None, Some(n)) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        // OpenAI's completions default is 16 tokens; chat runs to the end of the context.
        (None, None) if chat => None,
        (None, None) => Some(16),
    };
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
    let top_k = usize::try_from(uint(obj, "top_k", 0)?).unwrap_or(usize::MAX);
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => fresh_seed(),
        Some(_) => uint(obj, "seed", 0)?,
    };
    let stream = bool_field(obj, "stream", false)?;
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => {
            only_fields(o, &["include_usage"])
                .map_err(|(c, m)| (c, format!("in `stream_options`: {m}")))?;
            bool_field(o, "include_usage", false)?
        }
        Some(other) => {
            return Err((
                "invalid_type",
                format!(
                    "`stream_options` must be an object, got {}",
                    type_name(other)
                ),
            ))
        }
    };
    if let Some(name) = obj.get("user") {
        if !(name.is_string() || name.is_null()) {
            return Err(("invalid_type", "`user` must be a string".into()));
        }
    }
    if let Some(m) = obj.get("model") {
        if !(m.is_string() || m.is_null()) {
            return Err(("invalid_type", "`model` must be a string".into()));
        }
    }
    let stop = stop_field(obj)?;
    let penalties = Penalties {
        presence: number(obj, "presence_penalty", 0.0)? as f32,
        frequency: number(obj, "frequency_penalty", 0.0)? as f32,
        repetition: number(obj, "repetition_penalty", 1.0)? as f32,
    };
    penalties.validate().map_err(|m| ("invalid_value", m))?;
    let n = match (uint(obj, "n", 1)?, api) {
        (1, _) => 1,
        (_, Api::Lines) => {
            return Err((
                "unsupported_value",
                "`n` is not supported on JSON lines: one choice per id; send several lines".into(),
            ))
        }
        (n @ 2..=MAX_N, _) => n as usize,
        (n, _) => {
            return Err((
                "invalid_value",
                format!("`n` must be from 1 to {MAX_N}, got {n}"),
            ))
        }
    };
    let kv = super::kv::parse(obj)?;
    let template_vars = template_vars(obj)?;
    if !chat && !template_vars.is_empty() {
        return Err((
            "invalid_value",
            "`chat_template_kwargs` and `reasoning_effort` apply to chats only".into(),
        ));
    }
    Ok(Request {
        input,
        stream,
        echo,
        max_tokens,
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_k,
            top_p: top_p as f32,
            seed,
        },
        stop,
        include_usage,
        penalties,
        n,
        kv,
        template_vars: Box::new(template_vars),
    })
}

/// `chat_template_kwargs` (an object of template variables, as vLLM takes it) plus
/// `reasoning_effort` (OpenAI's field, given to the template under that name).
fn template_vars(obj: &Map<String, Value>) -> Result<Map<String, Value>, FieldError> {
    let mut vars = match obj.get("chat_template_kwargs") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(o)) => o.clone(),
        Some(other) => {
            return Err((
                "invalid_type",
                format!(
                    "`chat_template_kwargs` must be an object, got {}",
                    type_name(other)
                ),
            ))
        }
    };
    check_size(
        "chat_template_kwargs",
        Value::Object(vars.clone()).to_string().len(),
    )?;
    match obj.get("reasoning_effort") {
        None | Some(Value::Null) => {}
        Some(Value::String(e)) if ["minimal", "low", "medium", "high"].contains(&e.as_str()) => {
            if vars.contains_key("reasoning_effort") {
                return Err((
                    "invalid_value",
                    "give `reasoning_effort` or `chat_template_kwargs.reasoning_effort`, not both"
                        .into(),
                ));
            }
            vars.insert("reasoning_effort".into(), Value::String(e.clone()));
        }
        Some(other) => {
            return Err((
                "invalid_value",
                format!("`reasoning_effort` must be \"minimal\", \"low\", \"medium\" or \"high\", got {other}"),
            ))
        }
    }
    Ok(vars)
}

/// OpenAI fields edgemoe reads but does not implement: their neutral values pass, any other is
/// refused by name rather than ignored.
fn refuse_unsupported(obj: &Map<String, Value>) -> Result<(), FieldError> {
    let refuse = |field: &str, why: &str| {
        Err((
            "unsupported_value",
            format!("`{field}` is not supported: {why}"),
        ))
    };
    let num_is = |field: &str, neutral: f64| {
        obj.get(field)
            .is_none_or(|v| v.is_null() || v.as_f64() == Some(neutral))
    };
    let empty = |field: &str| {
        obj.get(field).is_none_or(|v| match v {
            Value::Null => true,
            Value::Bool(b) => !b,
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            Value::Number(n) => n.as_f64() == Some(0.0),
            Value::String(s) => s.is_empty() || s == "none" || s == "auto",
        })
    };
    if !num_is("best_of", 1.0) {
        return refuse("best_of", "one candidate per request");
    }
    for field in ["logprobs", "top_logprobs"] {
        if !empty(field) {
            return refuse(field, "log-probabilities are not returned");
        }
    }
    if !num_is("min_p", 0.0) {
        return refuse("min_p", "only 0; use `top_p` or `top_k`");
    }
    for field in [
        "logit_bias",
        "suffix",
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "parallel_tool_calls",
    ] {
        if !empty(field) {
            return refuse(field, "not implemented");
        }
    }
    match obj.get("response_format") {
        None | Some(Value::Null) => Ok(()),
        Some(v) if v == &json!({"type": "text"}) => Ok(()),
        Some(_) => refuse("response_format", "only {\"type\": \"text\"}"),
    }
}

fn prompt(v: &Value) -> Result<String, FieldError> {
    let prompt = match v {
        Value::String(s) => s.clone(),
        // A list of one string is OpenAI's batch form with a batch of one.
        Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        other => {
            return Err((
                "invalid_type",
                format!("`prompt` must be a string, got {}", type_name(other)),
            ))
        }
    };
    if prompt.is_empty() {
        return Err(("empty_prompt", "`prompt` is empty".into()));
    }
    check_size("prompt", prompt.len())?;
    Ok(prompt)
}

fn check_size(field: &str, bytes: usize) -> Result<(), FieldError> {
    if bytes > MAX_PROMPT_BYTES {
        return Err((
            "context_length_exceeded",
            format!("`{field}` is {bytes} bytes, over the {MAX_PROMPT_BYTES}-byte limit"),
        ));
    }
    Ok(())
}

/// Chat messages: `role` and `content` strings (a list of text parts is joined), `name` kept.
fn messages(v: &Value) -> Result<Vec<Value>, FieldError> {
    let list = v.as_array().ok_or((
        "invalid_type",
        "`messages` must be a list of objects".to_string(),
    ))?;
    if list.is_empty() {
        return Err(("empty_prompt", "`messages` is empty".into()));
    }
    let mut bytes = 0;
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let o = m
            .as_object()
            .ok_or(("invalid_type", format!("`messages[{i}]` must be an object")))?;
        only_fields(o, &["role", "content", "name"])
            .map_err(|(c, msg)| (c, format!("in `messages[{i}]`: {msg}")))?;
        let role = o.get("role").and_then(Value::as_str).ok_or((
            "invalid_type",
            format!("`messages[{i}].role` must be a string"),
        ))?;
        let content = match o.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => text_parts(parts, i)?,
            _ => {
                return Err((
                    "invalid_type",
                    format!("`messages[{i}].content` must be a string or a list of text parts"),
                ))
            }
        };
        bytes += content.len();
        let mut msg = Map::new();
        msg.insert("role".into(), role.into());
        msg.insert("content".into(), content.into());
        if let Some(name) = o.get("name") {
            msg.insert("name".into(), name.clone());
        }
        out.push(Value::Object(msg));
    }
    check_size("messages", bytes)?;
    Ok(out)
}

fn text_parts(parts: &[Value], i: usize) -> Result<String, FieldError> {
    let mut text = String::new();
    for p in parts {
        match (
            p.get("type").and_then(Value::as_str),
            p.get("text").and_then(Value::as_str),
        ) {
            (Some("text"), Some(t)) => text.push_str(t),
            _ => {
                return Err((
                    "unsupported_value",
                    format!("`messages[{i}].content` may hold only text parts ({{\"type\": \"text\", \"text\": ...}})"),
                ))
            }
        }
    }
    Ok(text)
}

fn stop_field(obj: &Map<String, Value>) -> Result<Vec<String>, FieldError> {
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
    // Each generated token is checked against every stop sequence's prefixes: keep that small.
    if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err((
            "invalid_value",
            format!(
                "a stop sequence may be at most {MAX_STOP_BYTES} bytes, got {}",
                long.len()
            ),
        ));
    }
    Ok(stop)
}

fn bool_field(obj: &Map<String, Value>, field: &str, default: bool) -> Result<bool, FieldError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err((
            "invalid_type",
            format!("`{field}` must be a boolean, got {}", type_name(other)),
        )),
    }
}

fn opt_uint(obj: &Map<String, Value>, field: &'static str) -> Result<Option<u64>, FieldError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => uint(obj, field, 0).map(Some),
    }
}

/// A seed for requests that bring none: different for every request, as OpenAI's sampling is.
pub fn fresh_seed() -> u64 {
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
    let mut v = json!({
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
    });
    if let Some(reason) = &out.error {
        v["error"] = json!({
            "message": format!("generation failed: {reason}"),
            "type": "server_error",
            "code": "generation_failed"
        });
    }
    v
}

pub fn finish_name(f: FinishReason) -> &'static str {
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
    fn set_gpu_mem_lines_parse() {
        assert!(matches!(
            parse(r#"{"op":"set_gpu_mem","bytes":4096}"#).unwrap(),
            Incoming::SetGpuMem { bytes: 4096 }
        ));
        assert_eq!(
            parse(r#"{"op":"set_gpu_mem"}"#).unwrap_err().code,
            "invalid_type"
        );
    }

    #[test]
    fn request_defaults_follow_openai() {
        match parse(r#"{"prompt":"hi"}"#).unwrap() {
            Incoming::Request { id, req } => {
                assert_eq!(id, "auto-1");
                assert!(!req.stream);
                assert_eq!(req.max_tokens, Some(16));
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
        let long = format!(
            r#"{{"id":"s","prompt":"x","stop":["{}"]}}"#,
            "a".repeat(257)
        );
        let e = parse(&long).unwrap_err();
        assert_eq!(e.code, "invalid_value");
        assert!(e.message.contains("at most 256 bytes"), "{}", e.message);
        let fits = format!(
            r#"{{"id":"s","prompt":"x","stop":["{}"]}}"#,
            "a".repeat(256)
        );
        assert!(parse(&fits).is_ok());
        assert_eq!(parse(r#"[1,2]"#).unwrap_err().code, "invalid_json");
        assert!(matches!(
            parse(r#"{"cancel":"r1"}"#),
            Ok(Incoming::Cancel { .. })
        ));
        assert!(matches!(parse(r#"{"op":"stats"}"#), Ok(Incoming::Stats)));
    }

    fn http(api: Api, body: serde_json::Value) -> Result<Request, FieldError> {
        parse_request(body.as_object().unwrap(), api)
    }

    /// Every OpenAI field clients commonly send is either used or refused by name; neutral
    /// values pass; a field of the other endpoint or a misspelt one is an unknown field.
    #[test]
    fn openai_fields_are_used_or_refused_by_name() {
        let chat = |extra: serde_json::Value| {
            let mut v = json!({"messages": [{"role": "user", "content": "hi"}]});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            http(Api::Chat, v)
        };
        let ok = chat(
            json!({"n": 1, "logprobs": false, "top_logprobs": 0, "presence_penalty": 0,
            "frequency_penalty": 0.0, "repetition_penalty": 1, "min_p": 0, "logit_bias": {},
            "user": "u", "model": "m", "seed": 3, "stop": "x", "tools": [],
            "response_format": {"type": "text"}, "stream_options": {"include_usage": true}}),
        )
        .unwrap();
        assert!(ok.include_usage);
        let p = chat(
            json!({"presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.1}),
        )
        .unwrap()
        .penalties;
        assert_eq!((p.presence, p.frequency, p.repetition), (0.5, -1.0, 1.1));
        let (code, msg) = chat(json!({"frequency_penalty": 2.5})).unwrap_err();
        assert!(
            code == "invalid_value" && msg.contains("`frequency_penalty`"),
            "{msg}"
        );
        assert_eq!(
            ok.max_tokens, None,
            "chat runs to the end of the context by default"
        );
        assert!(ok.template_vars.is_empty());
        let vars = chat(
            json!({"chat_template_kwargs": {"enable_thinking": false, "x": [1]},
                               "reasoning_effort": "high"}),
        )
        .unwrap()
        .template_vars;
        assert_eq!(
            Value::Object(*vars),
            json!({"enable_thinking": false, "x": [1], "reasoning_effort": "high"})
        );
        let (code, msg) = http(
            Api::Lines,
            json!({"prompt": "x", "chat_template_kwargs": {"enable_thinking": true}}),
        )
        .unwrap_err();
        assert!(
            code == "invalid_value" && msg.contains("chats only"),
            "{msg}"
        );
        assert_eq!(chat(json!({"n": 3})).unwrap().n, 3);
        for bad in [0, 17] {
            let (code, msg) = chat(json!({ "n": bad })).unwrap_err();
            assert!(code == "invalid_value" && msg.contains("`n`"), "{msg}");
        }
        let (code, _) = parse_line(r#"{"prompt":"x","n":2}"#, || "a".into())
            .map(|_| ())
            .map_err(|b| (b.code, b.message))
            .unwrap_err();
        assert_eq!(code, "unsupported_value");
        for (field, value) in [
            ("logprobs", json!(true)),
            ("top_logprobs", json!(3)),
            ("min_p", json!(0.05)),
            ("logit_bias", json!({"5": 10})),
            ("tools", json!([{"type": "function"}])),
            ("response_format", json!({"type": "json_object"})),
        ] {
            let (code, msg) = chat(json!({ field: value })).unwrap_err();
            assert_eq!(code, "unsupported_value", "{field}");
            assert!(msg.contains(&format!("`{field}`")), "{msg}");
        }
        for (api, field) in [
            (Api::Chat, "temperatur"),
            (Api::Chat, "prompt"),
            (Api::Chat, "echo"),
            (Api::Completions, "messages"),
        ] {
            let mut v = match api {
                Api::Chat => json!({"messages": [{"role": "user", "content": "hi"}]}),
                _ => json!({"prompt": "hi"}),
            };
            v[field] = json!(1);
            let (code, msg) = http(api, v).unwrap_err();
            assert_eq!(code, "unknown_field", "{field}");
            assert!(msg.contains(&format!("`{field}`")), "{msg}");
        }
        let (code, msg) =
            chat(json!({"messages": [{"role": "user", "content": "x", "tool_call_id": 1}]}))
                .unwrap_err();
        assert!(
            code == "unknown_field" && msg.contains("messages[0]"),
            "{msg}"
        );
        let parts = chat(json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}))
            .unwrap();
        assert_eq!(
            parts.input,
            PromptInput::Messages(vec![json!({"role": "user", "content": "ab"})])
        );
        let c = http(Api::Completions, json!({"prompt": ["one"], "echo": true})).unwrap();
        assert_eq!(
            (c.input, c.echo, c.max_tokens),
            (PromptInput::Text("one".into()), true, Some(16))
        );
    }
}
