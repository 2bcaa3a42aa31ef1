//! Chat templates: a checkpoint's Jinja `chat_template` rendered with minijinja the way
//! transformers' `apply_chat_template` renders it (trim_blocks and lstrip_blocks on, the
//! tokenizer's special tokens as variables, `raise_exception`, `strftime_now`, a `tojson` that
//! writes what Python's `json.dumps` writes, `tools` / `documents` / extra variables, and the
//! messages cleaned up as transformers does first). The rendered prompt already holds every
//! special token the template wants, so it is tokenized without the tokenizer adding any (as
//! transformers does). tests/chat_template.rs holds it to transformers' prompts, byte for byte,
//! on the real templates of the MoE families.

use crate::error::{Error, Result};
use crate::model::tokenizer::Tokenizer;
use minijinja::{Environment, ErrorKind};
use serde_json::Value;
use std::path::Path;

mod pyjson;

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// What a render sees beyond the messages, as transformers' `apply_chat_template` takes it.
#[derive(Default, Clone, Copy)]
pub struct ChatInputs<'a> {
    /// Tool schemas (OpenAI `tools`); `None` renders as transformers' `tools=None`.
    pub tools: Option<&'a [Value]>,
    /// Retrieval documents (Granite's `documents`).
    pub documents: Option<&'a [Value]>,
    /// Extra template variables (transformers' `**kwargs`, OpenAI's `chat_template_kwargs`):
    /// `enable_thinking` (Qwen3, GLM), `thinking` (DeepSeek-V3.1, Granite), `reasoning_effort`
    /// (GPT-OSS), ... They override the special tokens, as in transformers.
    pub kwargs: Option<&'a serde_json::Map<String, Value>>,
}

/// Variables the render sets itself; a kwarg of the same name is refused (Python refuses it too).
const RESERVED: [&str; 4] = ["messages", "tools", "documents", "add_generation_prompt"];

const NAME: &str = "chat_template";

/// Template instructions one render may run: real templates take about a hundred per message,
/// so this is tens of thousands of messages, and a few hundred milliseconds at most.
const TEMPLATE_FUEL: u64 = 20_000_000;

impl ChatTemplate {
    /// Compiles `source`; `bos`/`eos` are the tokenizer's special tokens as text.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::invalid(format!("chat template: {e}")))?;
        env.set_syntax(syntax);
        // A template comes with the model file: one that loops without end must fail its
        // request, not stall the scheduler.
        env.set_fuel(Some(TEMPLATE_FUEL));
        minijinja_contrib::add_to_environment(&mut env);
        // Python's str/dict/list methods (`.strip()`, `.items()`, ...) that templates call.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", pyjson::tojson);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| Error::invalid(format!("the chat template does not compile: {e}")))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The template a model carries: `chat_template.jinja` (or else `tokenizer_config.json`'s
    /// `chat_template`) in a checkpoint directory, `tokenizer.chat_template` in a GGUF file, the
    /// header's `chat_template` in an `.emoe` store (kept by `quantize`); `None` when it has
    /// none. The special tokens are the config's (directory) or the texts of the file's bos/eos
    /// token ids.
    pub fn for_model(path: &Path, tokenizer: &Tokenizer) -> Result<Option<ChatTemplate>> {
        if path.is_dir() {
            return from_checkpoint_dir(path);
        }
        let text = |id: Option<u64>| {
            id.and_then(|id| u32::try_from(id).ok())
                .and_then(|id| tokenizer.token_text(id))
                .unwrap_or_default()
        };
        if is_gguf(path) {
            let file = crate::model::gguf::GgufFile::open(path)?;
            let Some(source) = file.get("tokenizer.chat_template").and_then(|v| v.as_str()) else {
                return Ok(None);
            };
            let id = |key: &str| file.get(key).and_then(|v| v.as_u64());
            let (bos, eos) = (
                text(id("tokenizer.ggml.bos_token_id")),
                text(id("tokenizer.ggml.eos_token_id")),
            );
            return ChatTemplate::new(source, &bos, &eos).map(Some);
        }
        let file = crate::model::emoe::EmoeFile::open(path)?;
        let Some(source) = file.chat_template() else {
            return Ok(None);
        };
        let cfg = file.config();
        let bos = text(cfg.bos_token_id.map(u64::from));
        let eos = text(cfg.eos_token_ids.first().map(|&i| u64::from(i)));
        ChatTemplate::new(source, &bos, &eos).map(Some)
    }

    /// The template's source as `for_model` finds it, for `quantize` to keep in the store.
    pub fn source_for_model(path: &Path) -> Result<Option<String>> {
        if path.is_dir() {
            return Ok(checkpoint_dir_source(path)?.0);
        }
        if is_gguf(path) {
            let file = crate::model::gguf::GgufFile::open(path)?;
            let source = file.get("tokenizer.chat_template").and_then(|v| v.as_str());
            return Ok(source.map(str::to_string));
        }
        let file = crate::model::emoe::EmoeFile::open(path)?;
        Ok(file.chat_template().map(str::to_string))
    }

    /// Renders `messages` (objects with `role` and `content`); `add_generation_prompt` appends
    /// the opening of the assistant's turn.
    pub fn render(&self, messages: &[Value], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, ChatInputs::default())
    }

    /// [`render`](Self::render) with tools, documents and template variables.
    pub fn render_with(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        inputs: ChatInputs<'_>,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| Error::invalid(format!("chat template: {e}")))?;
        let messages = normalize_messages(messages)?;
        let mut ctx = serde_json::Map::new();
        ctx.insert("bos_token".into(), Value::from(self.bos_token.as_str()));
        ctx.insert("eos_token".into(), Value::from(self.eos_token.as_str()));
        for (k, v) in inputs.kwargs.into_iter().flatten() {
            if RESERVED.contains(&k.as_str()) {
                return Err(Error::invalid(format!(
                    "chat template variable `{k}` is set by the request itself"
                )));
            }
            ctx.insert(k.clone(), v.clone());
        }
        ctx.insert("messages".into(), Value::Array(messages));
        let list = |l: Option<&[Value]>| l.map_or(Value::Null, |l| Value::Array(l.to_vec()));
        ctx.insert("tools".into(), list(inputs.tools));
        ctx.insert("documents".into(), list(inputs.documents));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(add_generation_prompt),
        );
        tmpl.render(minijinja::Value::from(minijinja::value::Serde(&ctx)))
            .map_err(|e| Error::invalid(format!("the chat template failed: {}", describe(&e))))
    }

    /// Makes `strftime_now` read this instant (unix seconds, formatted as UTC) instead of the
    /// local clock, so that a template that prints today's date renders reproducibly.
    pub fn fix_clock(&mut self, unix_seconds: i64) {
        self.env
            .add_function("strftime_now", move |format: String| {
                strftime_at(&format, Some(unix_seconds))
            });
    }
}

/// transformers' normalisation of a conversation before its template sees it: keys whose value
/// is null are dropped, and a message's reasoning under any of its names (`reasoning_content`,
/// `thinking`, `reasoning`) is also given as `thinking` (GPT-OSS reads it) and
/// `reasoning_content` (the others do).
fn normalize_messages(messages: &[Value]) -> Result<Vec<Value>> {
    const REASONING: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let Value::Object(map) = m else {
            return Err(Error::invalid(format!("chat message {i} is not an object")));
        };
        let mut map: serde_json::Map<String, Value> = map
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(r) = REASONING.iter().find_map(|k| map.get(*k)).cloned() {
            // Python builds {"thinking": r, **message, "reasoning_content": r}: `thinking` keeps
            // the message's own value and place if it has one, else comes first.
            if !map.contains_key("thinking") {
                let mut first = serde_json::Map::new();
                first.insert("thinking".into(), r.clone());
                first.extend(map);
                map = first;
            }
            map.insert("reasoning_content".into(), r);
        }
        out.push(Value::Object(map));
    }
    Ok(out)
}

/// A minijinja error with its cause (e.g. the template's `raise_exception` message).
fn describe(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(d) if e.kind() == ErrorKind::InvalidOperation => d.to_string(),
        _ => e.to_string(),
    }
}

fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

fn from_checkpoint_dir(dir: &Path) -> Result<Option<ChatTemplate>> {
    let (source, config) = checkpoint_dir_source(dir)?;
    // A special token is a string or an AddedToken object with `content`.
    let token = |key: &str| match &config[key] {
        Value::String(s) => s.clone(),
        v => v["content"].as_str().unwrap_or_default().to_string(),
    };
    match source {
        Some(s) => ChatTemplate::new(&s, &token("bos_token"), &token("eos_token")).map(Some),
        None => Ok(None),
    }
}

/// A checkpoint directory's template source and its `tokenizer_config.json` (null if absent).
fn checkpoint_dir_source(dir: &Path) -> Result<(Option<String>, Value)> {
    let config_path = dir.join("tokenizer_config.json");
    let config: Value = match std::fs::read(&config_path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            Error::invalid(format!("{}: not valid JSON: {e}", config_path.display()))
        })?,
        Err(_) => Value::Null,
    };
    // As in transformers, a `chat_template.jinja` file wins over the config's entry.
    let file = dir.join("chat_template.jinja");
    let source = match std::fs::read(&file) {
        Ok(bytes) => Some(
            String::from_utf8(bytes)
                .map_err(|_| Error::invalid(format!("{}: not valid UTF-8", file.display())))?,
        ),
        Err(_) => match &config["chat_template"] {
            Value::String(s) => Some(s.clone()),
            // A list of named templates: the one called "default".
            Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(str::to_string),
            _ => None,
        },
    };
    Ok((source, config))
}

/// transformers' `strftime_now(format)`: the local time, formatted by the C library.
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    strftime_at(&format, None)
}

/// `format` applied to `at` (unix seconds, as UTC) or, without it, to the local time now.
fn strftime_at(format: &str, at: Option<i64>) -> std::result::Result<String, minijinja::Error> {
    let fmt = std::ffi::CString::new(format).map_err(|_| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "strftime format holds a NUL")
    })?;
    let mut buf = vec![0u8; 256];
    // SAFETY: `tm` is written by localtime_r/gmtime_r before it is read; `buf` outlives the call
    // and its length is passed, so strftime writes within it.
    let n = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        match at {
            Some(t) => {
                let t = t as libc::time_t;
                libc::gmtime_r(&t, &mut tm);
            }
            None => {
                let t = libc::time(std::ptr::null_mut());
                libc::localtime_r(&t, &mut tm);
            }
        }
        libc::strftime(buf.as_mut_ptr().cast(), buf.len(), fmt.as_ptr(), &tm)
    };
    buf.truncate(n);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_chatml_with_generation_prompt() {
        let t = ChatTemplate::new(
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
             {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            "<s>",
            "</s>",
        )
        .unwrap();
        let msgs = [json!({"role": "user", "content": "Hi"})];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&msgs, false).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn python_methods_exceptions_and_tojson() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}{% if m.role not in ['user'] %}\
             {{ raise_exception('only user messages, got ' + m.role) }}{% endif %}\
             {{ m.content.strip() | tojson }}{% endfor %}",
            "<s>",
            "</s>",
        )
        .unwrap();
        let ok = t
            .render(&[json!({"role": "user", "content": "  a<b  "})], false)
            .unwrap();
        assert_eq!(ok, "<s>\"a<b\"");
        let err = t
            .render(&[json!({"role": "tool", "content": "x"})], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("only user messages, got tool"), "{err}");
    }

    #[test]
    fn a_template_that_runs_forever_fails_its_render() {
        let t = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            "<s>",
            "</s>",
        )
        .unwrap();
        let err = t.render(&[], false).unwrap_err().to_string();
        assert!(err.contains("fuel"), "{err}");
        // A long real conversation stays far inside the allowance.
        let chatml = ChatTemplate::new(
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
            "<s>",
            "</s>",
        )
        .unwrap();
        let msgs: Vec<Value> = (0..10_000)
            .map(|i| json!({"role": "user", "content": format!("message {i}")}))
            .collect();
        assert!(chatml.render(&msgs, false).is_ok());
    }
}
