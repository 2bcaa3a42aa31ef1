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

/// A whole answer: one choice per output (`n` of them), each with its text.
pub fn whole(ids: &Ids, chat: bool, choices: &[(String, GenerateOutput)]) -> Value {
    let list: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, (text, out))| {
            let reason = finish_name(out.finish_reason);
            if chat {
                json!({"index": i, "message": {"role": "assistant", "content": text},
                       "logprobs": null, "finish_reason": reason})
            } else {
                json!({"index": i, "text": text, "logprobs": null, "finish_reason": reason})
            }
        })
        .collect();
    json!({
        "id": ids.id,
        "object": if chat { "chat.completion" } else { "text_completion" },
        "created": ids.created,
        "model": ids.model,
        "choices": list,
        "usage": usage_of(choices.iter().map(|(_, o)| o)),
    })
}

/// Token counts of a request's choices: the prompt once, every choice's completion.
pub fn usage_of<'a>(outs: impl Iterator<Item = &'a GenerateOutput>) -> Value {
    let (mut prompt, mut completion) = (0, 0);
    for o in outs {
        prompt = o.prompt_tokens;
        completion += o.completion_tokens;
    }
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": prompt + completion})
}

pub fn completion_chunk(
    ids: &Ids,
    index: usize,
    text: &str,
    finish: Option<FinishReason>,
) -> Value {
    json!({
        "id": ids.id,
        "object": "text_completion",
        "created": ids.created,
        "model": ids.model,
        "choices": [{"index": index, "text": text, "logprobs": null,
                     "finish_reason": finish.map(finish_name)}],
    })
}

/// A chat chunk; `delta` is `{"role": ...}`, `{"content": ...}` or `{}` at the end.
pub fn chat_chunk(ids: &Ids, index: usize, delta: Value, finish: Option<FinishReason>) -> Value {
    json!({
        "id": ids.id,
        "object": "chat.completion.chunk",
        "created": ids.created,
        "model": ids.model,
        "choices": [{"index": index, "delta": delta, "logprobs": null,
                     "finish_reason": finish.map(finish_name)}],
    })
}

/// The extra last chunk `stream_options.include_usage` asks for: no choices, the counts.
pub fn usage_chunk(ids: &Ids, chat: bool, usage: Value) -> Value {
    json!({
        "id": ids.id,
        "object": if chat { "chat.completion.chunk" } else { "text_completion" },
        "created": ids.created,
        "model": ids.model,
        "choices": [],
        "usage": usage,
    })
}

pub fn models(model_id: &str, created: u64) -> Value {
    json!({
        "object": "list",
        "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "edgemoe"}]
    })
}
