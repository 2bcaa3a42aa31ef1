//! `edgemoe generate`: one completion, streamed to stdout (or one JSON object with `--json`).

use super::ModelArgs;
use crate::engine::generation::{run as run_generation, GenerateRequest, Generation};
use crate::engine::penalties::Penalties;
use crate::engine::sampling::SamplingParams;
use crate::util::memory::MemoryReport;
use std::io::Write;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub kv: super::kv::KvArgs,
    /// The text to continue.
    #[arg(long)]
    pub prompt: String,
    /// Tokens to generate at most.
    #[arg(short = 'n', long = "max-tokens", default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temp: f32,
    /// Keep the K most likely tokens (0 = off).
    #[arg(long = "top-k", default_value_t = 0)]
    pub top_k: usize,
    /// Keep the smallest set of tokens with this much probability (1 = off).
    #[arg(long = "top-p", default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Sampling seed; without one a fresh seed is drawn (and printed, so the run can be
    /// repeated), as serve does.
    #[arg(long)]
    pub seed: Option<u64>,
    /// OpenAI's presence penalty: subtracted from the logit of every token already generated
    /// (-2 to 2; 0 = off).
    #[arg(
        long = "presence-penalty",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty: subtracted once per time a token was generated (-2 to 2).
    #[arg(
        long = "frequency-penalty",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub frequency_penalty: f32,
    /// transformers' repetition penalty over prompt and completion tokens (1 = off).
    #[arg(
        long = "repetition-penalty",
        default_value_t = 1.0,
        allow_negative_numbers = true
    )]
    pub repetition_penalty: f32,
    /// Stop when this string appears (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Serialize)]
struct JsonReport {
    text: String,
    prompt_tokens: usize,
    completion_tokens: usize,
    finish_reason: crate::engine::generation::FinishReason,
    /// The sampling seed used (drawn fresh when `--seed` was not given).
    seed: u64,
    prefill_ms: f64,
    decode_tokens_per_s: f64,
    peak_rss_bytes: Option<u64>,
    /// After loading, before the first token.
    memory_at_load: MemoryReport,
    /// At the end.
    memory: MemoryReport,
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    if !(a.temp >= 0.0 && a.temp.is_finite()) {
        anyhow::bail!("--temp must be a finite number >= 0");
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        anyhow::bail!("--top-p must be in (0, 1]");
    }
    let penalties = Penalties {
        presence: a.presence_penalty,
        frequency: a.frequency_penalty,
        repetition: a.repetition_penalty,
    };
    penalties.validate().map_err(|m| {
        anyhow::anyhow!(
            "{}",
            m.replacen('`', "--", 1).replace('`', "").replace('_', "-")
        )
    })?;
    let options = a.kv.options()?;
    // The KV caches `--mem` reserves: this one sequence, as far as it can reach.
    let engine = a.model.engine_for(|model| {
        let prompt = model.tokenizer.encode(&a.prompt, true)?.len().max(1);
        Ok(crate::kv::KvDemand {
            options,
            reach: prompt.saturating_add(a.max_tokens),
            sequences: 1,
        })
    })?;
    let memory_at_load = MemoryReport::new(engine.model().weight_memory(), 0);
    if !a.json {
        eprintln!("{memory_at_load} (after loading)");
    }
    let seed = a.seed.unwrap_or_else(crate::serve::protocol::fresh_seed);
    if a.seed.is_none() && a.temp > 0.0 && !a.json {
        eprintln!("seed {seed} (pass --seed {seed} to repeat this run)");
    }
    let req = GenerateRequest {
        prompt: a.prompt.clone(),
        max_tokens: a.max_tokens,
        sampling: SamplingParams {
            temperature: a.temp,
            top_k: a.top_k,
            top_p: a.top_p,
            seed,
        },
        stop: a.stop.clone(),
    };
    let mut stdout = std::io::stdout().lock();
    let mut gen = Generation::new(&engine, &req)?;
    gen.set_penalties(penalties);
    let out = run_generation(&engine, gen, |piece| {
        if !a.json && !piece.is_empty() {
            // A closed stdout (e.g. `| head`) ends generation instead of panicking.
            return write!(stdout, "{piece}")
                .and_then(|_| stdout.flush())
                .is_ok();
        }
        true
    })?;
    let result = if a.json {
        let report = JsonReport {
            text: out.text,
            prompt_tokens: out.prompt_tokens,
            completion_tokens: out.completion_tokens,
            finish_reason: out.finish_reason,
            seed,
            prefill_ms: out.prefill_ms,
            decode_tokens_per_s: out.decode_tokens_per_s,
            peak_rss_bytes: crate::util::peak_rss_bytes(),
            memory_at_load,
            memory: MemoryReport::new(engine.model().weight_memory(), out.kv_bytes),
        };
        writeln!(stdout, "{}", serde_json::to_string(&report)?)
    } else {
        let r = writeln!(stdout);
        eprintln!(
            "prompt {} tokens, prefill {:.1} ms; {} tokens at {:.1} tokens/s (finish reason: {})",
            out.prompt_tokens,
            out.prefill_ms,
            out.completion_tokens,
            out.decode_tokens_per_s,
            crate::serve::protocol::finish_name(out.finish_reason)
        );
        let memory = MemoryReport::new(engine.model().weight_memory(), out.kv_bytes);
        eprintln!("{memory}");
        r
    };
    a.model.paging.report(&engine);
    match result {
        // A reader that went away (`| head`) ends the run quietly.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}
