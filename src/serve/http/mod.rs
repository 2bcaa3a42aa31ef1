//! `edgemoe serve --http ADDR`: OpenAI-compatible HTTP on the same continuous-batching
//! scheduler as the JSON-lines mode.
//!
//! HTTP is our own small synchronous server (`wire`: no async runtime; the scheduler owns the
//! engine on one thread and every connection gets a plain thread). The socket is bound before
//! the model loads, so `/health` answers 503 while loading. Handlers parse and validate, then
//! send the request to the scheduler loop with a channel of their own for the replies; a
//! streaming handler whose client went away drops that channel, and the scheduler cancels the
//! request at its next token. A streaming handler learns the client left when a write fails;
//! one writing a whole answer at the end watches the client's socket while it waits (`peer`).

mod dashboard;
mod handler;
mod metrics;
mod openai;
mod peer;
mod stats;
#[cfg(test)]
mod tests;
mod wire;

use super::chat::ChatTemplate;
use super::protocol::{Api, Request};
use super::scheduler::{Event, Scheduler, SchedulerOptions};
use crate::engine::generation::GenerateOutput;
use crate::engine::Engine;
use std::net::TcpListener;
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Duration;

/// How the HTTP server listens and what it accepts.
pub struct HttpOptions {
    /// Address to listen on (`127.0.0.1:0`: a port the OS picks, see [`HttpServer::addr`]).
    pub addr: String,
    /// Clients must send `Authorization: Bearer KEY` when set.
    pub api_key: Option<String>,
    /// Batch size, queue length and prompt chunking of the continuous-batching scheduler.
    pub scheduler: SchedulerOptions,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Most connections open at once (each has a thread); more are answered 503 at once.
    pub max_connections: usize,
    /// How long an open (keep-alive) connection may wait for its next request. Longer than a
    /// proxy's idle upstream connections (nginx: 60 s), so the proxy closes them first.
    pub idle_timeout: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            addr: "127.0.0.1:8080".into(),
            api_key: None,
            scheduler: SchedulerOptions::default(),
            max_body_bytes: 4 << 20,
            max_connections: 512,
            idle_timeout: Duration::from_secs(75),
        }
    }
}

/// What handlers know once the model is loaded.
struct Ready {
    model_id: String,
}

/// State every handler thread shares.
struct Shared {
    ready: OnceLock<Ready>,
    to_scheduler: mpsc::Sender<ToScheduler>,
    api_key: Option<String>,
    max_body_bytes: usize,
    /// Unix time the server started (OpenAI's `created`).
    created: u64,
}

enum ToScheduler {
    Submit {
        req: Request,
        /// Which of the request's `n` choices this is.
        index: usize,
        reply: mpsc::Sender<Reply>,
    },
    Metrics(mpsc::Sender<String>),
    /// The dashboard's stats (`GET /v1/stats`).
    Stats(mpsc::Sender<serde_json::Value>),
}

/// What the scheduler sends a handler.
enum Reply {
    /// Refused before any work: HTTP status, error code, message.
    Refused(u16, &'static str, String),
    /// New text of choice `.0`.
    Text(usize, String),
    /// Choice `.0` ended.
    Done(usize, GenerateOutput),
}

/// A request's data inside the scheduler.
struct Tag {
    reply: mpsc::Sender<Reply>,
    stream: bool,
    index: usize,
}

/// Binds `opts.addr`, then loads the model with `load` (answering 503 meanwhile) and serves
/// until the process ends.
pub fn serve_http(
    opts: HttpOptions,
    load: impl FnOnce() -> anyhow::Result<(Engine, Option<ChatTemplate>)>,
) -> anyhow::Result<()> {
    HttpServer::bind(opts)?.serve(load)
}

/// An HTTP server bound to its address but not serving yet: what a program embedding edgemoe
/// uses to learn the port it got (`127.0.0.1:0`) before serving.
pub struct HttpServer {
    listener: TcpListener,
    opts: HttpOptions,
    addr: String,
}

impl HttpServer {
    /// Listens on `opts.addr` (requests wait until [`Self::serve`]).
    pub fn bind(opts: HttpOptions) -> anyhow::Result<HttpServer> {
        let listener = TcpListener::bind(opts.addr.as_str())
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", opts.addr))?;
        let addr = listener
            .local_addr()
            .map_or_else(|_| opts.addr.clone(), |a| a.to_string());
        Ok(HttpServer {
            listener,
            opts,
            addr,
        })
    }

    /// The address it listens on, with the port the OS chose for port 0.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Loads the model with `load` (answering 503 meanwhile) and serves until the process ends.
    pub fn serve(
        self,
        load: impl FnOnce() -> anyhow::Result<(Engine, Option<ChatTemplate>)>,
    ) -> anyhow::Result<()> {
        let HttpServer {
            listener,
            opts,
            addr,
        } = self;
        eprintln!("listening on http://{addr}");
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            ready: OnceLock::new(),
            to_scheduler: tx,
            api_key: opts.api_key.clone(),
            max_body_bytes: opts.max_body_bytes,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        });
        let config = wire_config(&opts);
        let handler_shared = Arc::clone(&shared);
        let handler: Arc<wire::Handler> =
            Arc::new(move |request: wire::Request<'_>| handler::handle(request, &handler_shared));
        std::thread::Builder::new()
            .name("http-accept".into())
            .spawn(move || wire::accept(listener, config, handler))
            .map_err(|e| anyhow::anyhow!("cannot start the accept thread: {e}"))?;
        let (engine, chat) = load()?;
        let model_id = std::path::Path::new(&engine.model().source)
            .file_name()
            .map_or_else(
                || engine.model().source.clone(),
                |n| n.to_string_lossy().into_owned(),
            );
        let _ = shared.ready.set(Ready { model_id });
        eprintln!("ready");
        run_scheduler(&engine, chat.as_ref(), opts.scheduler, rx);
        Ok(())
    }
}

/// The HTTP layer's limits for `opts`.
fn wire_config(opts: &HttpOptions) -> wire::Config {
    wire::Config {
        max_connections: opts.max_connections.max(1),
        idle_timeout: opts.idle_timeout,
        head_timeout: Duration::from_secs(30),
        io_timeout: Duration::from_secs(60),
        refusal: handler::refusal_response,
    }
}

/// The scheduler loop: takes requests between steps, blocks only when idle.
fn run_scheduler(
    engine: &Engine,
    chat: Option<&ChatTemplate>,
    opts: SchedulerOptions,
    rx: mpsc::Receiver<ToScheduler>,
) {
    let mut sched: Scheduler<Tag> = Scheduler::new(engine, opts);
    let mut emit = |tag: &mut Tag, ev: Event| match ev {
        Event::Text(t) if tag.stream => tag
            .reply
            .send(Reply::Text(tag.index, t.to_string()))
            .is_ok(),
        // A whole answer needs no text yet, but the send tells whether its handler (which
        // watches the client's socket) is still waiting.
        Event::Text(_) => tag
            .reply
            .send(Reply::Text(tag.index, String::new()))
            .is_ok(),
        Event::Done(out) => tag.reply.send(Reply::Done(tag.index, out.clone())).is_ok(),
    };
    loop {
        if sched.is_idle() {
            match rx.recv() {
                Ok(m) => take(&mut sched, chat, m, &mut emit),
                Err(_) => return,
            }
        }
        while let Ok(m) = rx.try_recv() {
            take(&mut sched, chat, m, &mut emit);
        }
        sched.step(&mut emit);
    }
}

fn take(
    sched: &mut Scheduler<Tag>,
    chat: Option<&ChatTemplate>,
    m: ToScheduler,
    emit: &mut impl FnMut(&mut Tag, Event) -> bool,
) {
    match m {
        ToScheduler::Metrics(reply) => {
            let _ = reply.send(metrics::render(sched));
        }
        ToScheduler::Stats(reply) => {
            let _ = reply.send(stats::render(sched, chat.is_some()));
        }
        ToScheduler::Submit { req, index, reply } => {
            let gen = match super::prepare(sched.engine(), chat, &req) {
                Ok(g) => g,
                Err((code, msg)) => {
                    let _ = reply.send(Reply::Refused(400, code, msg));
                    return;
                }
            };
            let tag = Tag {
                reply,
                stream: req.stream,
                index,
            };
            if let Err(tag) = sched.submit(tag, gen, emit) {
                let _ = tag.reply.send(Reply::Refused(
                    503,
                    "queue_full",
                    "the request queue is full; retry later".into(),
                ));
            }
        }
    }
}

/// The schema of a path's POST body.
fn api_for(path: &str) -> Option<Api> {
    match path {
        "/v1/completions" => Some(Api::Completions),
        "/v1/chat/completions" => Some(Api::Chat),
        _ => None,
    }
}
