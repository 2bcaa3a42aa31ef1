//! `edgemoe serve`: JSON lines over stdin/stdout (see `crate::serve`), or OpenAI-compatible HTTP
//! with `--http ADDR` (see `crate::serve::http`). Logs go to stderr.

use super::ModelArgs;
use crate::serve::chat::ChatTemplate;
use crate::serve::http::{serve_http, HttpOptions};
use crate::serve::scheduler::SchedulerOptions;
use crate::serve::{serve, ServeOptions};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub kv: super::kv::KvArgs,
    /// Most requests decoded together in one step (1 to 4096).
    #[arg(long = "max-batch", default_value_t = 16, value_parser = batch_size)]
    pub max_batch: usize,
    /// Most requests waiting for a place in the batch; more are refused at once (HTTP 503).
    #[arg(long = "max-queue", default_value_t = 256)]
    pub max_queue: usize,
    /// Most prompt tokens a request prefills per step, so a long prompt does not stall the
    /// streams already decoding (0: whole prompts in one step).
    #[arg(long = "prefill-chunk", default_value_t = 256)]
    pub prefill_chunk: usize,
    /// Serve OpenAI-compatible HTTP on this address (e.g. 127.0.0.1:8080) instead of JSON
    /// lines on stdin/stdout.
    #[arg(long)]
    pub http: Option<String>,
    /// With --http: require `Authorization: Bearer KEY` (every route but /health).
    #[arg(long = "api-key", requires = "http")]
    pub api_key: Option<String>,
    /// With --http: largest request body accepted, in bytes.
    #[arg(long = "max-body", default_value_t = 4 << 20, requires = "http")]
    pub max_body: usize,
    /// With --http: most connections open at once (each has a thread); more are answered
    /// 503 and closed.
    #[arg(long = "max-connections", default_value_t = 512, value_parser = connections, requires = "http")]
    pub max_connections: usize,
    /// A Jinja chat template file, used instead of the model's own for `messages` requests.
    #[arg(long = "chat-template")]
    pub chat_template: Option<PathBuf>,
}

fn batch_size(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=4096).contains(&n) => Ok(n),
        _ => Err(format!("`{s}` is not a batch size from 1 to 4096")),
    }
}

fn connections(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{s}` is not a number of connections (1 or more)")),
    }
}

/// The chat template: the file given, else the model's own (none for built-in models).
fn chat_template(a: &ServeArgs, engine: &crate::Engine) -> anyhow::Result<Option<ChatTemplate>> {
    let tokenizer = &engine.model().tokenizer;
    if let Some(path) = &a.chat_template {
        let source = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let token = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or_default();
        let cfg = &engine.model().config;
        let eos = token(cfg.eos_token_ids.first().copied());
        return Ok(Some(ChatTemplate::new(
            &source,
            &token(cfg.bos_token_id),
            &eos,
        )?));
    }
    match a.model.model.as_deref() {
        Some(p) if !p.to_string_lossy().starts_with("builtin:") => {
            Ok(ChatTemplate::for_model(p, tokenizer)?)
        }
        _ => Ok(None),
    }
}

/// The KV caches `--mem` reserves for a server: a full batch of requests that may each fill the
/// context (within the default budget; a request asking for more than that is refused).
fn kv_demand(a: &ServeArgs) -> anyhow::Result<crate::kv::KvDemand> {
    Ok(crate::kv::KvDemand {
        options: a.kv.options()?,
        reach: usize::MAX,
        sequences: a.max_batch,
    })
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let scheduler = SchedulerOptions {
        max_batch: a.max_batch,
        max_queue: a.max_queue,
        prefill_chunk: a.prefill_chunk,
    };
    if let Some(addr) = a.http.clone() {
        let opts = HttpOptions {
            addr,
            api_key: a.api_key.clone(),
            scheduler,
            max_body_bytes: a.max_body,
            max_connections: a.max_connections,
            ..HttpOptions::default()
        };
        return serve_http(opts, || {
            let engine = a.model.engine_for(|_| kv_demand(&a))?;
            let chat = chat_template(&a, &engine)?;
            Ok((engine, chat))
        });
    }
    if a.api_key.is_some() {
        anyhow::bail!("--api-key applies to --http only");
    }
    let engine = a.model.engine_for(|_| kv_demand(&a))?;
    let chat_template = chat_template(&a, &engine)?;
    let stdin = std::io::BufReader::new(std::io::stdin());
    serve(
        &engine,
        stdin,
        std::io::stdout().lock(),
        ServeOptions {
            scheduler,
            chat_template,
        },
    )?;
    Ok(())
}
