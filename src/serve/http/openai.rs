//! OpenAI's response objects: completions and chat completions, whole or as stream chunks,
//! and errors.

use crate::engine::generation::{FinishReason, GenerateOutput};
use serde_json::{json, Value};

/// Names shared by every object of one response.
pub struct Ids<'a> {
    pub id: &'a str,
    pub model: &'a str,
    pub created: u64,
}

pub fn error(message: &str, kind: &str, code: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

pub fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "cancelled",
        FinishReason::Error => "error",
    }
}

pub fn usage(out: &GenerateOutput) -> Value {
    json!({
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "total_tokens": out.prompt_tokens + out.completion_tokens
    })
}

pub fn completion(ids: &Ids, text: &str, out: &GenerateOutput) -> Value {
    json!({
        "id": ids.id,
        "object": "text_completion",
        "created": ids.created,
        "model": ids.model,
        "choices": [{"index": 0, "text": text, "logprobs": null,
                     "finish_reason": finish_name(out.finish_reason)}],
        "usage": usage(out),
    })
}

pub fn chat(ids: &Ids, text: &str, out: &GenerateOutput) -> Value {
    json!({
        "id": ids.id,
        "object": "chat.completion",
        "created": ids.created,
        "model": ids.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": null, "finish_reason": finish_name(out.finish_reason)}],
        "usage": usage(out),
    })
}

pub fn completion_chunk(ids: &Ids, text: &str, finish: Option<FinishReason>) -> Value {
    json!({
        "id": ids.id,
        "object": "text_completion",
        "created": ids.created,
        "model": ids.model,
        "choices": [{"index": 0, "text": text, "logprobs": null,
                     "finish_reason": finish.map(finish_name)}],
    })
}

/// A chat chunk; `delta` is `{"role": ...}`, `{"content": ...}` or `{}` at the end.
pub fn chat_chunk(ids: &Ids, delta: Value, finish: Option<FinishReason>) -> Value {
    json!({
        "id": ids.id,
        "object": "chat.completion.chunk",
        "created": ids.created,
        "model": ids.model,
        "choices": [{"index": 0, "delta": delta, "logprobs": null,
                     "finish_reason": finish.map(finish_name)}],
    })
}

/// The extra last chunk `stream_options.include_usage` asks for: no choices, the counts.
pub fn usage_chunk(ids: &Ids, chat: bool, out: &GenerateOutput) -> Value {
    json!({
        "id": ids.id,
        "object": if chat { "chat.completion.chunk" } else { "text_completion" },
        "created": ids.created,
        "model": ids.model,
        "choices": [],
        "usage": usage(out),
    })
}

pub fn models(model_id: &str, created: u64) -> Value {
    json!({
        "object": "list",
        "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "edgemoe"}]
    })
}
