//! `edgemoe serve`: JSON lines in, JSON lines out, with continuous batching.
//!
//! A reader thread turns stdin into messages; the scheduler loop admits new requests between
//! decode steps, runs one batched forward step over every active request (new prompts prefill in
//! the same step as others decode), hands each its logits, and writes whole lines. A request
//! joins and leaves the batch between steps; end of input finishes what is in flight.

pub mod protocol;

use crate::engine::generation::Generation;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::kv::KvCache;
use protocol::{parse_line, BadLine, Incoming};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::sync::mpsc;

pub struct ServeOptions {
    /// Most requests decoded together in one step; the rest wait in arrival order.
    pub max_batch: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions { max_batch: 16 }
    }
}

enum Message {
    Line(String),
    NotUtf8,
    TooLong,
    Eof,
}

struct Active {
    id: String,
    stream: bool,
    gen: Generation,
}

/// Serves until `input` ends and every admitted request has finished.
pub fn serve<R: BufRead + Send + 'static, W: Write>(
    engine: &Engine,
    input: R,
    out: W,
    opts: &ServeOptions,
) -> Result<()> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || read_lines(input, tx));
    let mut server = Server {
        engine,
        out,
        active: Vec::new(),
        waiting: VecDeque::new(),
        next_id: 0,
        max_batch: opts.max_batch.max(1),
        spare_caches: Vec::new(),
    };
    server.write(&json!({
        "object": "edgemoe.ready",
        "model": engine.model().source,
        "architecture": engine.model().config.arch.hf_name(),
        "threads": engine.threads(),
    }))?;
    let mut eof = false;
    loop {
        if server.active.is_empty() && server.waiting.is_empty() {
            if eof {
                return Ok(());
            }
            // Idle: block for the next line.
            match rx.recv() {
                Ok(m) => eof |= server.handle(m)?,
                Err(_) => eof = true,
            }
        }
        while let Ok(m) = rx.try_recv() {
            eof |= server.handle(m)?;
        }
        server.admit()?;
        server.step()?;
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
    engine: &'e Engine,
    out: W,
    active: Vec<Active>,
    waiting: VecDeque<Active>,
    next_id: u64,
    max_batch: usize,
    /// KV caches of finished requests, emptied and kept for the next ones (at most
    /// `max_batch`): their memory is already mapped, so decoding takes no page faults.
    spare_caches: Vec<KvCache>,
}

impl<W: Write> Server<'_, W> {
    fn write(&mut self, v: &Value) -> Result<()> {
        let line = serde_json::to_string(v).map_err(|e| Error::invalid(e.to_string()))?;
        // One write per line, flushed, so lines never interleave mid-object.
        writeln!(self.out, "{line}")
            .and_then(|_| self.out.flush())
            .map_err(|e| Error::io("<stdout>", e))
    }

    /// The expert cache's counters and prediction quality (`null` without `--mem`).
    fn expert_stats(&self) -> Value {
        let tokens = self.engine.stats.snapshot().tokens;
        json!({
            "cache": self.engine.experts.cache_stats(tokens),
            "prediction": self.engine.experts.prediction(),
        })
    }

    fn reject(&mut self, bad: BadLine) -> Result<()> {
        self.write(&bad.to_json())
    }

    /// Handles one message; returns true at end of input.
    fn handle(&mut self, m: Message) -> Result<bool> {
        match m {
            Message::Eof => return Ok(true),
            Message::TooLong => self.reject(BadLine {
                id: None,
                message: format!("the line is longer than {MAX_LINE_BYTES} bytes"),
                kind: "invalid_request_error",
                code: "line_too_long",
            })?,
            Message::NotUtf8 => self.reject(BadLine {
                id: None,
                message: "the line is not valid UTF-8".into(),
                kind: "invalid_request_error",
                code: "invalid_utf8",
            })?,
            Message::Line(line) => {
                let next = &mut self.next_id;
                let in_flight: Vec<&str> = self
                    .active
                    .iter()
                    .chain(&self.waiting)
                    .map(|a| a.id.as_str())
                    .collect();
                // An automatic id skips any a client chose for a request still in flight.
                let parsed = parse_line(&line, || loop {
                    *next += 1;
                    let id = format!("cmpl-{next}");
                    if !in_flight.contains(&id.as_str()) {
                        break id;
                    }
                });
                match parsed {
                    Err(bad) => self.reject(bad)?,
                    Ok(Incoming::Stats) => {
                        let stats = json!({
                            "object": "edgemoe.stats",
                            "active": self.active.len(),
                            "waiting": self.waiting.len(),
                            "runtime": self.engine.stats.snapshot(),
                            "memory": self.memory(),
                            "experts": self.expert_stats(),
                        });
                        self.write(&stats)?
                    }
                    Ok(Incoming::SetMem { bytes }) => {
                        // Between steps: the cache resizes under the running requests.
                        let reply = match self.engine.experts.set_mem(bytes) {
                            Ok(slots) => {
                                json!({"object": "edgemoe.set_mem", "bytes": bytes, "slots": slots})
                            }
                            Err(e) => {
                                json!({"error": {"message": e.to_string(), "type": "invalid_request_error", "code": "set_mem_refused"}})
                            }
                        };
                        self.write(&reply)?
                    }
                    Ok(Incoming::Cancel { id }) => self.cancel(id)?,
                    Ok(Incoming::Request { id, stream, req }) => self.submit(id, stream, &req)?,
                }
            }
        }
        Ok(false)
    }

    fn submit(
        &mut self,
        id: String,
        stream: bool,
        req: &crate::engine::generation::GenerateRequest,
    ) -> Result<()> {
        let bad = |code, message: String| BadLine {
            id: Some(id.clone()),
            message,
            kind: "invalid_request_error",
            code,
        };
        if self.active.iter().chain(&self.waiting).any(|a| a.id == id) {
            return self.reject(bad(
                "duplicate_id",
                format!("request `{id}` is already in flight"),
            ));
        }
        let cache = self
            .spare_caches
            .pop()
            .unwrap_or_else(|| self.engine.new_cache());
        let gen = match Generation::with_cache(self.engine, req, cache) {
            Ok(g) => g,
            Err(e) => return self.reject(bad("invalid_prompt", e.to_string())),
        };
        let limit = self.engine.model().config.max_position_embeddings;
        if gen.prompt_tokens().saturating_add(req.max_tokens) > limit {
            let msg = format!(
                "prompt ({} tokens) plus max_tokens ({}) exceeds the model's context of {limit} tokens",
                gen.prompt_tokens(),
                req.max_tokens
            );
            return self.reject(bad("context_length_exceeded", msg));
        }
        let a = Active { id, stream, gen };
        if a.gen.finished().is_some() {
            return self.finish(a);
        }
        self.waiting.push_back(a);
        Ok(())
    }

    fn cancel(&mut self, id: String) -> Result<()> {
        let pos_active = self.active.iter().position(|a| a.id == id);
        let pos_waiting = self.waiting.iter().position(|a| a.id == id);
        let mut a = match (pos_active, pos_waiting) {
            (Some(i), _) => self.active.remove(i),
            (None, Some(i)) => match self.waiting.remove(i) {
                Some(a) => a,
                None => return Ok(()),
            },
            (None, None) => {
                return self.reject(BadLine {
                    id: Some(id.clone()),
                    message: format!("no request `{id}` is in flight"),
                    kind: "invalid_request_error",
                    code: "not_found",
                })
            }
        };
        a.gen.cancel();
        self.finish(a)
    }

    fn admit(&mut self) -> Result<()> {
        while self.active.len() < self.max_batch {
            match self.waiting.pop_front() {
                Some(mut a) => {
                    a.gen.start_clock();
                    self.active.push(a);
                }
                None => break,
            }
        }
        Ok(())
    }

    /// One batched forward step over every active request.
    fn step(&mut self) -> Result<()> {
        if self.active.is_empty() {
            return Ok(());
        }
        let mut items: Vec<_> = self.active.iter_mut().map(|a| a.gen.batch_item()).collect();
        let result = self.engine.forward(&mut items);
        drop(items);
        let tokenizer = &self.engine.model().tokenizer;
        let mut lines = Vec::new();
        match result {
            Ok(logits) => {
                for (a, l) in self.active.iter_mut().zip(&logits) {
                    // A request whose logits cannot be sampled ends alone, with an error.
                    match a.gen.accept(l, tokenizer) {
                        Ok(piece) if a.stream && !piece.is_empty() => {
                            lines.push(protocol::chunk(&a.id, &piece))
                        }
                        Ok(_) => {}
                        Err(e) => eprintln!("serve: request {}: {e}", a.id),
                    }
                }
            }
            Err(e) => {
                eprintln!("serve: step failed: {e}");
                for a in &mut self.active {
                    a.gen.fail();
                }
            }
        }
        for line in lines {
            self.write(&line)?;
        }
        let (done, still): (Vec<Active>, Vec<Active>) = std::mem::take(&mut self.active)
            .into_iter()
            .partition(|a| a.gen.finished().is_some());
        self.active = still;
        for a in done {
            self.finish(a)?;
        }
        Ok(())
    }

    /// Weights, every KV cache held (running requests' and spare ones), and the resident set.
    fn memory(&self) -> crate::util::memory::MemoryReport {
        let kv = self
            .active
            .iter()
            .map(|a| a.gen.cache.allocated_bytes())
            .sum::<usize>()
            + self
                .spare_caches
                .iter()
                .map(KvCache::allocated_bytes)
                .sum::<usize>();
        crate::util::memory::MemoryReport::new(self.engine.model().weight_memory(), kv)
    }

    /// Writes a request's last line and keeps its cache for a later request.
    fn finish(&mut self, a: Active) -> Result<()> {
        let v = protocol::completion(
            &a.id,
            &self.engine.model().source,
            a.stream,
            &a.gen.output(),
        );
        if self.spare_caches.len() < self.max_batch {
            self.spare_caches.push(a.gen.into_cache());
        }
        self.write(&v)
    }
}
