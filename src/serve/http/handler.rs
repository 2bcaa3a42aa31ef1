//! One HTTP request on its own thread: route, check the key, read and validate the body, hand
//! the request to the scheduler and answer with its replies (whole, or as server-sent events).

use super::dashboard;
use super::openai::{self, Ids};
use super::wire::{Method, Refusal, Request, Response, Stream};
use super::{api_for, Reply, Shared, ToScheduler};
use crate::engine::generation::{FinishReason, GenerateOutput};
use crate::serve::protocol::{parse_request, Api, PromptInput};
use serde_json::{json, Value};
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

fn json_response(status: u16, body: &Value) -> Response {
    Response::from_data(body.to_string().into_bytes())
        .with_status_code(status)
        .with_header("Content-Type", "application/json")
}

fn send(request: Request<'_>, response: Response) {
    // A client that left before its answer needs no answer.
    request.respond(response);
}

fn error_kind(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        404 => "not_found_error",
        500 => "server_error",
        503 => "overloaded_error",
        _ => "invalid_request_error",
    }
}

/// An error in OpenAI's shape; a 503 says when to retry.
fn error_response(status: u16, code: &str, message: &str) -> Response {
    let r = json_response(status, &openai::error(message, error_kind(status), code));
    if status == 503 {
        return r.with_header("Retry-After", "1");
    }
    r
}

fn fail(request: Request<'_>, status: u16, code: &str, message: &str) {
    send(request, error_response(status, code, message));
}

/// What the HTTP layer answers a request it cannot serve (malformed, too large, too many
/// connections).
pub(super) fn refusal_response(r: &Refusal) -> Response {
    error_response(r.status, r.code, &r.message)
}

/// Compares a client's key with ours in time that depends only on the lengths, so response
/// times do not reveal how much of a guess was right.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    let diff = given
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    // black_box: keep the optimizer from turning the fold into an early exit.
    std::hint::black_box(diff) == 0 && given.len() == expected.len()
}

pub(super) fn handle(request: Request<'_>, shared: &Shared) {
    let path = request.url().split('?').next().unwrap_or("").to_string();
    // The dashboard's page and script hold no data (they fetch `/v1/stats` with the key the
    // user types in), and a browser cannot send a bearer header when it opens a URL.
    if path != "/health" && !dashboard::is_asset(&path) {
        if let Some(key) = &shared.api_key {
            let expected = format!("Bearer {key}");
            let given = request.header("Authorization");
            if !given.is_some_and(|g| same_secret(g.as_bytes(), expected.as_bytes())) {
                return fail(
                    request,
                    401,
                    "invalid_api_key",
                    "a valid `Authorization: Bearer KEY` header is required",
                );
            }
        }
    }
    let ready = shared.ready.get();
    let broken = crate::backend::health::unusable();
    match (request.method(), path.as_str()) {
        // A sticky device failure: every request would fail, so the replica says so (a load
        // balancer then sends work elsewhere) and refuses work with the reason.
        (Method::Get, "/health") if broken.is_some() => send(
            request,
            json_response(503, &json!({"status": "unhealthy", "reason": broken})),
        ),
        (Method::Post, p) if broken.is_some() && api_for(p).is_some() => {
            fail(request, 503, "unhealthy", broken.unwrap_or_default())
        }
        (Method::Get, "/health") => match ready {
            Some(_) => send(request, json_response(200, &json!({"status": "ok"}))),
            None => {
                let r = json_response(503, &json!({"status": "loading"}))
                    .with_header("Retry-After", "1");
                send(request, r)
            }
        },
        (Method::Get, p) if dashboard::is_asset(p) => page(request, p),
        (_, _) if ready.is_none() => fail(request, 503, "loading", "the model is still loading"),
        (Method::Get, "/v1/models") => {
            let id = ready.map_or("", |r| r.model_id.as_str());
            send(
                request,
                json_response(200, &openai::models(id, shared.created)),
            )
        }
        (Method::Get, "/metrics") => metrics(request, shared),
        (Method::Get, "/v1/stats") => stats(request, shared, ready.map_or("", |r| &r.model_id)),
        (Method::Post, p) if api_for(p).is_some() => {
            let api = api_for(p).unwrap_or(Api::Completions);
            let model = ready.map_or("", |r| r.model_id.as_str()).to_string();
            complete(request, shared, api, &model)
        }
        (_, p)
            if api_for(p).is_some()
                || dashboard::is_asset(p)
                || ["/health", "/v1/models", "/metrics", "/v1/stats"].contains(&p) =>
        {
            fail(
                request,
                405,
                "method_not_allowed",
                "method not allowed here",
            )
        }
        _ => fail(request, 404, "not_found", &format!("no route {path}")),
    }
}

fn metrics(request: Request<'_>, shared: &Shared) {
    let (tx, rx) = mpsc::channel();
    if shared.to_scheduler.send(ToScheduler::Metrics(tx)).is_err() {
        return fail(request, 503, "unavailable", "the scheduler has stopped");
    }
    match rx.recv() {
        Ok(text) => send(
            request,
            Response::from_data(text.into_bytes())
                .with_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8"),
        ),
        Err(_) => fail(request, 503, "unavailable", "the scheduler has stopped"),
    }
}

/// A file of the dashboard, with a policy that lets it load nothing from elsewhere.
fn page(request: Request<'_>, path: &str) {
    let Some(a) = dashboard::asset(path) else {
        return fail(request, 404, "not_found", &format!("no route {path}"));
    };
    let r = Response::from_data(a.body.as_bytes().to_vec())
        .with_header("Content-Type", a.content_type)
        .with_header(
            "Content-Security-Policy",
            dashboard::CONTENT_SECURITY_POLICY,
        )
        .with_header("X-Content-Type-Options", "nosniff")
        .with_header("Cache-Control", "no-cache");
    send(request, r)
}

fn stats(request: Request<'_>, shared: &Shared, model: &str) {
    let (tx, rx) = mpsc::channel();
    if shared.to_scheduler.send(ToScheduler::Stats(tx)).is_err() {
        return fail(request, 503, "unavailable", "the scheduler has stopped");
    }
    match rx.recv() {
        Ok(mut v) => {
            v["model"] = json!(model);
            let r = json_response(200, &v).with_header("Cache-Control", "no-store");
            send(request, r)
        }
        Err(_) => fail(request, 503, "unavailable", "the scheduler has stopped"),
    }
}

/// Reads at most `limit` bytes of body; `None` when it is longer.
fn read_body(request: &mut Request<'_>, limit: usize) -> Option<std::io::Result<Vec<u8>>> {
    if request.body_length().is_some_and(|n| n > limit as u64) {
        return None;
    }
    let mut body = Vec::new();
    match request.body().take(limit as u64 + 1).read_to_end(&mut body) {
        Ok(_) if body.len() > limit => None,
        Ok(_) => Some(Ok(body)),
        Err(e) => Some(Err(e)),
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn complete(mut request: Request<'_>, shared: &Shared, api: Api, model: &str) {
    let limit = shared.max_body_bytes;
    let body = match read_body(&mut request, limit) {
        None => {
            return fail(
                request,
                413,
                "body_too_large",
                &format!("the request body is over the {limit}-byte limit"),
            )
        }
        Some(Err(e)) => return fail(request, 400, "bad_body", &format!("cannot read body: {e}")),
        Some(Ok(b)) => b,
    };
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return fail(
                request,
                400,
                "invalid_json",
                &format!("malformed JSON: {e}"),
            )
        }
    };
    let Some(obj) = value.as_object() else {
        return fail(
            request,
            400,
            "invalid_json",
            "the body must be a JSON object",
        );
    };
    let req = match parse_request(obj, api) {
        Ok(r) => r,
        Err((code, msg)) => return fail(request, 400, code, &msg),
    };
    let echo = match (&req.input, req.echo) {
        (PromptInput::Text(t), true) => t.clone(),
        _ => String::new(),
    };
    let (stream, include_usage, n) = (req.stream, req.include_usage, req.n);
    let (tx, rx) = mpsc::channel();
    // `n` choices are `n` requests on the scheduler; choice i samples with seed + i.
    for index in 0..n {
        let mut one = req.clone();
        one.sampling.seed = req.sampling.seed.wrapping_add(index as u64);
        let msg = ToScheduler::Submit {
            req: one,
            index,
            reply: tx.clone(),
        };
        if shared.to_scheduler.send(msg).is_err() {
            return fail(request, 503, "unavailable", "the scheduler has stopped");
        }
    }
    drop(tx);
    let chat = api == Api::Chat;
    let id = format!(
        "{}-{}",
        if chat { "chatcmpl" } else { "cmpl" },
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    );
    let ids = Ids {
        id: &id,
        model,
        created: shared.created,
    };
    let first = match rx.recv() {
        Ok(Reply::Refused(status, code, msg)) => return fail(request, status, code, &msg),
        Ok(r) => r,
        Err(_) => return fail(request, 500, "internal", "the request was lost"),
    };
    if stream {
        let sse = Sse {
            ids: &ids,
            chat,
            include_usage,
            n,
        };
        sse.run(request, echo, first, rx);
        return;
    }
    let mut outs: Vec<Option<GenerateOutput>> = vec![None; n];
    let mut watch = Watch::new();
    let mut next = Some(first);
    loop {
        if watch.client_left(&request) {
            // Returning drops `rx`: the scheduler's next send fails and cancels the request.
            return;
        }
        let r = match next.take() {
            Some(r) => r,
            None => match rx.recv_timeout(Watch::EVERY) {
                Ok(r) => r,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            },
        };
        match r {
            Reply::Done(i, out) => outs[i] = Some(out),
            Reply::Refused(status, code, msg) => return fail(request, status, code, &msg),
            Reply::Text(..) => {}
        }
        if outs.iter().all(Option::is_some) {
            break;
        }
    }
    let Some(outs) = outs.into_iter().collect::<Option<Vec<_>>>() else {
        return fail(request, 500, "internal", "the request was lost");
    };
    if let Some(o) = outs.iter().find(|o| o.finish_reason == FinishReason::Error) {
        return fail(request, 500, "generation_failed", &failure_message(o));
    }
    let choices: Vec<(String, GenerateOutput)> = outs
        .into_iter()
        .map(|o| (echo.clone() + &o.text, o))
        .collect();
    send(
        request,
        json_response(200, &openai::whole(&ids, chat, &choices)),
    )
}

/// Watches the client of a whole (non-streaming) answer while it is generated.
struct Watch {
    checked: std::time::Instant,
}

impl Watch {
    /// How often the client's socket is checked.
    const EVERY: std::time::Duration = std::time::Duration::from_millis(20);

    fn new() -> Watch {
        Watch {
            checked: std::time::Instant::now(),
        }
    }

    /// Whether the client has gone, looked at no more often than [`Self::EVERY`].
    fn client_left(&mut self, request: &Request<'_>) -> bool {
        if self.checked.elapsed() < Self::EVERY {
            return false;
        }
        self.checked = std::time::Instant::now();
        request.client_closed()
    }
}

/// A streamed answer: server-sent events in a chunked HTTP/1.1 body, one flushed chunk per
/// event, ending in `data: [DONE]` once every choice has ended.
struct Sse<'a> {
    ids: &'a Ids<'a>,
    chat: bool,
    include_usage: bool,
    n: usize,
}

impl Sse<'_> {
    fn run(&self, request: Request<'_>, echo: String, first: Reply, rx: mpsc::Receiver<Reply>) {
        let head = [
            ("Content-Type", "text/event-stream"),
            ("Cache-Control", "no-cache"),
        ];
        let Some(mut w) = request.stream(200, &head) else {
            return;
        };
        let mut ok = true;
        for i in 0..self.n {
            if self.chat {
                let role = json!({"role": "assistant", "content": ""});
                ok &= event(&mut w, &openai::chat_chunk(self.ids, i, role, None));
            }
            if !echo.is_empty() {
                ok &= self.text(&mut w, i, &echo);
            }
        }
        // Returning drops `rx`: the scheduler's next send fails and cancels the requests.
        let mut done: Vec<GenerateOutput> = Vec::with_capacity(self.n);
        let mut reply = Some(first);
        while ok {
            let r = match reply.take() {
                Some(r) => r,
                None => match rx.recv() {
                    Ok(r) => r,
                    Err(_) => return,
                },
            };
            match r {
                Reply::Text(i, t) => ok = self.text(&mut w, i, &t),
                Reply::Done(i, out) => {
                    ok = self.choice_done(&mut w, i, &out);
                    done.push(out);
                    if done.len() == self.n {
                        if ok && self.include_usage {
                            let usage = openai::usage_of(done.iter());
                            event(&mut w, &openai::usage_chunk(self.ids, self.chat, usage));
                        }
                        finish(w);
                        return;
                    }
                }
                Reply::Refused(_, code, msg) => {
                    event(&mut w, &openai::error(&msg, "invalid_request_error", code));
                    finish(w);
                    return;
                }
            }
        }
    }

    fn text(&self, w: &mut Stream<'_>, index: usize, text: &str) -> bool {
        let v = if self.chat {
            openai::chat_chunk(self.ids, index, json!({"content": text}), None)
        } else {
            openai::completion_chunk(self.ids, index, text, None)
        };
        event(w, &v)
    }

    /// The last chunk of one choice (an error event when it failed).
    fn choice_done(&self, w: &mut Stream<'_>, index: usize, out: &GenerateOutput) -> bool {
        if out.finish_reason == FinishReason::Error {
            let msg = failure_message(out);
            return event(w, &openai::error(&msg, "server_error", "generation_failed"));
        }
        let last = if self.chat {
            openai::chat_chunk(self.ids, index, json!({}), Some(out.finish_reason))
        } else {
            openai::completion_chunk(self.ids, index, "", Some(out.finish_reason))
        };
        event(w, &last)
    }
}

/// What a failed choice's client is told.
fn failure_message(out: &GenerateOutput) -> String {
    match &out.error {
        Some(reason) => format!("generation failed: {reason}"),
        None => "generation failed (the server log has the cause)".into(),
    }
}

/// One `data:` event, sent at once as one HTTP chunk; false when the client is gone.
fn event(w: &mut Stream<'_>, v: &Value) -> bool {
    w.send(format!("data: {v}\n\n").as_bytes())
}

fn finish(mut w: Stream<'_>) {
    let _ = w.send(b"data: [DONE]\n\n") && w.finish();
}

#[cfg(test)]
mod secret_tests {
    use super::same_secret;

    #[test]
    fn secrets_compare_by_every_byte() {
        assert!(same_secret(b"Bearer k1", b"Bearer k1"));
        assert!(!same_secret(b"Bearer k2", b"Bearer k1"));
        assert!(!same_secret(b"Bearer k1x", b"Bearer k1"));
        assert!(!same_secret(b"Bearer k", b"Bearer k1"));
        assert!(!same_secret(b"", b"Bearer k1"));
    }
}
