//! `edgemoe serve --http ADDR`: OpenAI-compatible HTTP on the same continuous-batching
//! scheduler as the JSON-lines mode.
//!
//! HTTP is tiny_http's (small, synchronous, no async runtime: the scheduler owns the engine on
//! one thread and every request gets a plain handler thread). The socket is bound before the
//! model loads, so `/health` answers 503 while loading. Handlers parse and validate, then send
//! the request to the scheduler loop with a channel of their own for the replies; a streaming
//! handler whose client went away drops that channel, and the scheduler cancels the request at
//! its next token. A streaming handler learns the client left when a write fails; one writing a
//! whole answer at the end watches the client's socket while it waits (`peer`).

mod dashboard;
mod handler;
mod metrics;
mod openai;
mod peer;
mod stats;
#[cfg(test)]
mod tests;

use super::chat::ChatTemplate;
use super::protocol::{Api, Request};
use super::scheduler::{Event, Scheduler, SchedulerOptions};
use crate::engine::generation::GenerateOutput;
use crate::engine::Engine;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, OnceLock};

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
    /// Most requests handled at once (each has a thread); more are answered 503 at once.
    pub max_connections: usize,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            addr: "127.0.0.1:8080".into(),
            api_key: None,
            scheduler: SchedulerOptions::default(),
            max_body_bytes: 4 << 20,
            max_connections: 512,
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
    max_connections: usize,
    handlers: AtomicUsize,
    /// Unix time the server started (OpenAI's `created`).
    created: u64,
    /// The port the server listens on (finds a request's socket, see `peer`).
    port: u16,
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
    server: tiny_http::Server,
    opts: HttpOptions,
    addr: String,
}

impl HttpServer {
    /// Listens on `opts.addr` (requests wait until [`Self::serve`]).
    pub fn bind(opts: HttpOptions) -> anyhow::Result<HttpServer> {
        let server = tiny_http::Server::http(&opts.addr)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", opts.addr))?;
        let addr = server
            .server_addr()
            .to_ip()
            .map_or_else(|| opts.addr.clone(), |a| a.to_string());
        Ok(HttpServer { server, opts, addr })
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
        let HttpServer { server, opts, addr } = self;
        let ip = server.server_addr().to_ip();
        eprintln!("listening on http://{addr}");
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            ready: OnceLock::new(),
            to_scheduler: tx,
            api_key: opts.api_key.clone(),
            max_body_bytes: opts.max_body_bytes,
            max_connections: opts.max_connections.max(1),
            handlers: AtomicUsize::new(0),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            port: ip.map_or(0, |a| a.port()),
        });
        let accept_shared = Arc::clone(&shared);
        std::thread::spawn(move || accept(server, accept_shared));
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

fn accept(server: tiny_http::Server, shared: Arc<Shared>) {
    accept_with(server, shared, |job| {
        std::thread::Builder::new()
            .name("http".into())
            .spawn(job)
            .map(drop)
    })
}

/// A handler job: what runs on a request's own thread.
type Job = Box<dyn FnOnce() + Send>;

/// [`accept`] with the thread spawner as a parameter (tests make it fail).
fn accept_with(
    server: tiny_http::Server,
    shared: Arc<Shared>,
    spawn: impl Fn(Job) -> std::io::Result<()>,
) {
    for request in server.incoming_requests() {
        if shared.handlers.fetch_add(1, Ordering::AcqRel) >= shared.max_connections {
            shared.handlers.fetch_sub(1, Ordering::AcqRel);
            handler::respond_busy(request, "too many requests in flight; retry later");
            continue;
        }
        let job_shared = Arc::clone(&shared);
        let job = Box::new(move || {
            handler::handle(request, &job_shared);
            job_shared.handlers.fetch_sub(1, Ordering::AcqRel);
        });
        if spawn(job).is_err() {
            // The job was dropped unrun (tiny_http answers its request 500): give back its
            // place, or max_connections such failures would refuse every request after.
            shared.handlers.fetch_sub(1, Ordering::AcqRel);
            eprintln!("serve: cannot start a handler thread");
        }
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
