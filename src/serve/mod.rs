//! `edgemoe serve`: JSON lines in, JSON lines out (this module), or OpenAI-compatible HTTP
//! (`http`), both on one continuous-batching `scheduler`.
//!
//! Here a reader thread turns stdin into messages; the loop admits new requests between decode
//! steps, runs one batched forward step over every active request and writes whole lines. End
//! of input finishes what is in flight.

pub mod chat;
#[cfg(test)]
mod fault;
pub mod http;
pub mod kv;
pub(crate) mod protocol;
pub(crate) mod scheduler;

use crate::engine::generation::Generation;
use crate::engine::Engine;
use crate::error::{Error, Result};
use chat::ChatTemplate;
use protocol::{parse_line, BadLine, Incoming, PromptInput, Request};
use scheduler::{Event, Scheduler, SchedulerOptions};
use serde_json::{json, Value};
use std::io::{BufRead, Write};
use std::sync::mpsc;

#[derive(Default)]
pub struct ServeOptions {
    pub scheduler: SchedulerOptions,
    /// For `messages` requests; without one they are refused.
    pub chat_template: Option<ChatTemplate>,
}

enum Message {
    Line(String),
    NotUtf8,
    TooLong,
    Eof,
}

/// A request's line-protocol data.
struct Tag {
    id: String,
    stream: bool,
    /// Text put before the completion (`echo`).
    echo: Option<String>,
}

/// A request turned into a generation: tokenized (a chat rendered first) and checked against
/// the model's context. The error is a code and a message with the numbers.
pub fn prepare(
    engine: &Engine,
    chat: Option<&ChatTemplate>,
    req: &Request,
) -> std::result::Result<Generation, protocol::FieldError> {
    let model = engine.model();
    let (text, special) = match &req.input {
        PromptInput::Text(t) => (t.clone(), true),
        PromptInput::Messages(m) => {
            let Some(t) = chat else {
                return Err((
                    "no_chat_template",
                    "the model has no chat template (serve --chat-template FILE gives one); send `prompt` instead".into(),
                ));
            };
            (
                t.render_with(
                    m,
                    true,
                    chat::ChatInputs {
                        kwargs: Some(&*req.template_vars),
                        ..Default::default()
                    },
                )
                .map_err(|e| ("invalid_prompt", e.to_string()))?,
                false,
            )
        }
    };
    let tokens = model
        .tokenizer
        .encode(&text, special)
        .map_err(|e| ("invalid_prompt", e.to_string()))?;
    let limit = model.config.max_position_embeddings;
    let n = tokens.len().max(1);
    if n >= limit {
        return Err((
            "context_length_exceeded",
            format!("the prompt is {n} tokens; the model's context is {limit} tokens, which leaves no room to generate"),
        ));
    }
    let max_tokens = match req.max_tokens {
        Some(m) if n.saturating_add(m) > limit => {
            return Err((
                "context_length_exceeded",
                format!("prompt ({n} tokens) plus max_tokens ({m}) exceeds the model's context of {limit} tokens"),
            ))
        }
        Some(m) => m,
        None => limit - n,
    };
    let kv = kv::options(engine, req.kv, n.saturating_add(max_tokens))?;
    let mut gen = Generation::from_tokens_with_kv(
        engine,
        tokens,
        &req.generate_request(text, max_tokens),
        kv,
    )
    .map_err(|e| ("invalid_prompt", e.to_string()))?;
    gen.set_penalties(req.penalties);
    Ok(gen)
}

/// Serves until `input` ends and every admitted request has finished.
pub fn serve<R: BufRead + Send + 'static, W: Write>(
    engine: &Engine,
    input: R,
    out: W,
    opts: ServeOptions,
) -> Result<()> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || read_lines(input, tx));
    let mut server = Server {
        sched: Scheduler::new(engine, opts.scheduler),
        chat: opts.chat_template,
        out: Writer {
            out,
            model: engine.model().source.clone(),
            failed: None,
        },
        next_id: 0,
    };
    server.out.write(&json!({
        "object": "edgemoe.ready",
        "model": engine.model().source,
        "architecture": engine.model().config.arch.hf_name(),
        "threads": engine.threads(),
    }));
    let mut eof = false;
    loop {
        if let Some(e) = server.out.failed.take() {
            return Err(e);
        }
        if server.sched.is_idle() {
            if eof {
                return Ok(());
            }
            // Idle: block for the next line.
            match rx.recv() {
                Ok(m) => eof |= server.handle(m),
                Err(_) => eof = true,
            }
        }
        while let Ok(m) = rx.try_recv() {
            eof |= server.handle(m);
        }
        let out = &mut server.out;
        server
            .sched
            .step(&mut |tag: &mut Tag, ev: Event| out.event(tag, ev));
    }
}

/// Longest input line kept in memory; a longer one is skipped and answered with an error.
const MAX_LINE_BYTES: usize = 4 * protocol::MAX_PROMPT_BYTES;

fn read_lines<R: BufRead>(mut input: R, tx: mpsc::Sender<Message>) {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match std::io::Read::take(&mut input, MAX_LINE_BYTES as u64 + 1).read_until(b'\n', &mut buf)
        {
            Ok(0) | Err(_) => break,
            Ok(_) if buf.len() > MAX_LINE_BYTES && buf.last() != Some(&b'\n') => {
                // Drop the rest of the line without buffering it.
                let mut sink = Vec::new();
                while let Ok(n) =
                    std::io::Read::take(&mut input, 1 << 16).read_until(b'\n', &mut sink)
                {
                    if n == 0 || sink.last() == Some(&b'\n') {
                        break;
                    }
                    sink.clear();
                }
                if tx.send(Message::TooLong).is_err() {
                    return;
                }
            }
            Ok(_) => {
                while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    buf.pop();
                }
                if buf.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let msg = match String::from_utf8(std::mem::take(&mut buf)) {
                    Ok(s) => Message::Line(s),
                    Err(_) => Message::NotUtf8,
                };
                if tx.send(msg).is_err() {
                    return;
                }
            }
        }
    }
    let _ = tx.send(Message::Eof);
}

struct Server<'e, W: Write> {
    sched: Scheduler<'e, Tag>,
    chat: Option<ChatTemplate>,
    out: Writer<W>,
    next_id: u64,
}

/// Stdout, one flushed line per object; the first write error is kept and ends the server.
struct Writer<W: Write> {
    out: W,
    model: String,
    failed: Option<Error>,
}

impl<W: Write> Writer<W> {
    fn write(&mut self, v: &Value) {
        if self.failed.is_some() {
            return;
        }
        let line = v.to_string();
        // One write per line, flushed, so lines never interleave mid-object.
        if let Err(e) = writeln!(self.out, "{line}").and_then(|_| self.out.flush()) {
            self.failed = Some(Error::io("<stdout>", e));
        }
    }

    fn event(&mut self, tag: &mut Tag, ev: Event) -> bool {
        match ev {
            Event::Text(piece) if tag.stream => {
                if let Some(echo) = tag.echo.take() {
                    self.write(&protocol::chunk(&tag.id, &echo));
                }
                self.write(&protocol::chunk(&tag.id, piece))
            }
            Event::Text(_) => {}
            Event::Done(out) => {
                let mut out = out.clone();
                if let Some(echo) = tag.echo.take() {
                    if tag.stream {
                        self.write(&protocol::chunk(&tag.id, &echo));
                    } else {
                        out.text.insert_str(0, &echo);
                    }
                }
                self.write(&protocol::completion(
                    &tag.id,
                    &self.model,
                    tag.stream,
                    &out,
                ))
            }
        }
        self.failed.is_none()
    }
}

impl<W: Write> Server<'_, W> {
    /// The expert cache's counters and prediction quality (`null` without `--mem`).
    fn expert_stats(&self) -> Value {
        let engine = self.sched.engine();
        let tokens = engine.stats.snapshot().tokens;
        json!({
            "cache": engine.experts.cache_stats(tokens),
            "prediction": engine.experts.prediction(),
            "kv_reserved": engine.experts.plan().map(|p| p.fixed.kv),
        })
    }

    /// Each running request's KV cache: its policy and budget (tokens), the slots its fullest
    /// layer holds and the bytes it allocated.
    fn kv_stats(&self) -> Value {
        let rows: Vec<Value> = self
            .sched
            .running()
            .map(|(tag, gen)| {
                let mut row = kv::sequence(gen);
                row["id"] = json!(tag.id);
                row
            })
            .collect();
        Value::Array(rows)
    }

    /// Handles one message; returns true at end of input.
    fn handle(&mut self, m: Message) -> bool {
        match m {
            Message::Eof => return true,
            Message::TooLong => self.out.write(
                &BadLine::new(
                    None,
                    "line_too_long",
                    format!("the line is longer than {MAX_LINE_BYTES} bytes"),
                )
                .to_json(),
            ),
            Message::NotUtf8 => self.out.write(
                &BadLine::new(None, "invalid_utf8", "the line is not valid UTF-8").to_json(),
            ),
            Message::Line(line) => {
                let next = &mut self.next_id;
                let in_flight: Vec<&str> = self.sched.tags().map(|t| t.id.as_str()).collect();
                // An automatic id skips any a client chose for a request still in flight.
                let parsed = parse_line(&line, || loop {
                    *next += 1;
                    let id = format!("cmpl-{next}");
                    if !in_flight.contains(&id.as_str()) {
                        break id;
                    }
                });
                match parsed {
                    Err(bad) => self.out.write(&bad.to_json()),
                    Ok(Incoming::Stats) => {
                        let memory = crate::util::memory::MemoryReport::new(
                            self.sched.engine().model().weight_memory(),
                            self.sched.kv_bytes(),
                        );
                        let stats = json!({
                            "object": "edgemoe.stats",
                            "active": self.sched.active_len(),
                            "waiting": self.sched.queue_depth(),
                            "runtime": self.sched.engine().stats.snapshot(),
                            "memory": memory,
                            "requests": self.sched.counters,
                            "experts": self.expert_stats(),
                            "kv": self.kv_stats(),
                        });
                        self.out.write(&stats)
                    }
                    Ok(Incoming::SetMem { bytes }) => {
                        // Between steps: the cache resizes under the running requests.
                        let reply = match self.sched.engine().experts.set_mem(bytes) {
                            Ok(slots) => {
                                json!({"object": "edgemoe.set_mem", "bytes": bytes, "slots": slots})
                            }
                            Err(e) => json!({"error": {
                                "message": e.to_string(),
                                "type": "invalid_request_error",
                                "code": "set_mem_refused"
                            }}),
                        };
                        self.out.write(&reply)
                    }
                    Ok(Incoming::SetGpuMem { bytes }) => {
                        let reply = match self.sched.engine().set_gpu_mem(bytes) {
                            Ok(slots) => json!({
                                "object": "edgemoe.set_gpu_mem", "bytes": bytes, "slots": slots
                            }),
                            Err(e) => json!({"error": {
                                "message": e.to_string(),
                                "type": "invalid_request_error",
                                "code": "set_gpu_mem_refused"
                            }}),
                        };
                        self.out.write(&reply)
                    }
                    Ok(Incoming::Cancel { id }) => {
                        let out = &mut self.out;
                        if !self
                            .sched
                            .cancel(|t| t.id == id, &mut |t: &mut Tag, ev| out.event(t, ev))
                        {
                            let msg = format!("no request `{id}` is in flight");
                            self.out
                                .write(&BadLine::new(Some(id), "not_found", msg).to_json());
                        }
                    }
                    Ok(Incoming::Request { id, req }) => self.submit(id, &req),
                }
            }
        }
        false
    }

    fn submit(&mut self, id: String, req: &Request) {
        if self.sched.tags().any(|t| t.id == id) {
            let msg = format!("request `{id}` is already in flight");
            return self
                .out
                .write(&BadLine::new(Some(id), "duplicate_id", msg).to_json());
        }
        let gen = match prepare(self.sched.engine(), self.chat.as_ref(), req) {
            Ok(g) => g,
            Err((code, msg)) => {
                return self.out.write(&BadLine::new(Some(id), code, msg).to_json())
            }
        };
        let echo = match (&req.input, req.echo) {
            (PromptInput::Text(t), true) => Some(t.clone()),
            _ => None,
        };
        let tag = Tag {
            id,
            stream: req.stream,
            echo,
        };
        let out = &mut self.out;
        if let Err(tag) = self
            .sched
            .submit(tag, gen, &mut |t: &mut Tag, ev| out.event(t, ev))
        {
            let msg = "the queue is full; retry later".to_string();
            self.out
                .write(&BadLine::new(Some(tag.id), "queue_full", msg).to_json());
        }
    }
}
