//! One completion as a state machine that a scheduler can step: it says which tokens to run next,
//! takes the logits back, samples, decodes a text piece, and decides when to finish (eos, a stop
//! string, the token limit). `generate` drives one alone; `serve` batches many.

#![warn(missing_docs)]

use super::penalties::{Penalties, PenaltyState};
use super::sampling::{Sampler, SamplingParams};
use super::{BatchItem, Engine, Logits};
use crate::error::{Error, Result};
use crate::kv::{KvCache, KvOptions};
use crate::model::tokenizer::StreamDecoder;
use std::time::Instant;

/// One completion to run.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The text to continue (tokenized with the model's special tokens, e.g. BOS).
    pub prompt: String,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// How the next token is chosen.
    pub sampling: SamplingParams,
    /// The completion ends before any of these strings (which is not part of the text).
    pub stop: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
/// Why a completion ended.
pub enum FinishReason {
    /// The model's end-of-sequence token, or a stop string.
    Stop,
    /// `max_tokens`, or the model's context, was reached.
    Length,
    /// The caller stopped it.
    Cancelled,
    /// A step failed ([`GenerateOutput::error`] says why).
    Error,
}

#[derive(Debug, Clone, serde::Serialize)]
/// A finished (or stopped) completion.
pub struct GenerateOutput {
    /// The generated text (without the prompt).
    pub text: String,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Milliseconds from the start to the first generated token.
    pub prefill_ms: f64,
    /// Milliseconds of decoding after the first token.
    pub decode_ms: f64,
    /// Tokens per second of decoding after the first token.
    pub decode_tokens_per_s: f64,
    /// Bytes the KV cache allocated.
    pub kv_bytes: usize,
    /// Why the generation failed (`finish_reason` "error"), for the client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One completion's state, stepped by [`run`], the server's scheduler or a [`TokenStream`](super::stream::TokenStream).
pub struct Generation {
    prompt: Vec<u32>,
    /// The sequence's KV cache.
    pub cache: KvCache,
    sampler: Sampler,
    decoder: StreamDecoder,
    stop: Vec<String>,
    max_tokens: usize,
    eos: Vec<u32>,
    generated: Vec<u32>,
    text: String,
    emitted: usize,
    finish: Option<FinishReason>,
    /// Why it failed, when it did.
    error: Option<String>,
    started: Instant,
    prefill_ms: f64,
    decode_started: Option<Instant>,
    /// Most prompt tokens per step (0: the whole prompt in one step).
    prefill_chunk: usize,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// Tokens the last `batch_item` handed out.
    step_tokens: usize,
    /// Presence, frequency and repetition penalties, when any is on.
    penalties: Option<PenaltyState>,
    /// This sequence's KV budget and policy (the engine's unless a request chose its own).
    kv: KvOptions,
}

impl Generation {
    /// Ends the generation, handing back its KV cache's memory for reuse.
    pub fn into_cache(self) -> KvCache {
        self.cache
    }

    /// Tokenizes `req.prompt` and sets up an empty KV cache.
    pub fn new(engine: &Engine, req: &GenerateRequest) -> Result<Generation> {
        Generation::with_cache(engine, req, engine.new_cache())
    }

    /// Like [`Generation::new`], reusing `cache`'s memory (emptied first): a server recycles
    /// the caches of finished requests instead of faulting in fresh pages for each one.
    pub fn with_cache(
        engine: &Engine,
        req: &GenerateRequest,
        cache: KvCache,
    ) -> Result<Generation> {
        let prompt = engine.model().tokenizer.encode(&req.prompt, true)?;
        let mut g = Generation::from_tokens(engine, prompt, req)?;
        g.attach_cache(engine, cache);
        Ok(g)
    }

    /// A generation over an already tokenized prompt (`req.prompt` is not read), with an empty
    /// cache that holds no memory yet: a server tokenizes and checks a request when it arrives
    /// and gives it KV memory ([`Self::attach_cache`]) only when it is admitted to the batch.
    pub fn from_tokens(
        engine: &Engine,
        prompt: Vec<u32>,
        req: &GenerateRequest,
    ) -> Result<Generation> {
        Generation::from_tokens_with_kv(engine, prompt, req, *engine.kv_options())
    }

    /// [`Self::from_tokens`] with this sequence's own KV budget and policy (a serve request's).
    pub fn from_tokens_with_kv(
        engine: &Engine,
        mut prompt: Vec<u32>,
        req: &GenerateRequest,
        kv: KvOptions,
    ) -> Result<Generation> {
        let model = engine.model();
        if prompt.is_empty() {
            // An empty prompt still needs a first token to condition on.
            match model.config.bos_token_id {
                Some(b) => prompt.push(b),
                None => {
                    return Err(Error::invalid(
                        "the prompt is empty and the model has no BOS token",
                    ))
                }
            }
        }
        // The model's context bounds prompt and completion together: a prompt that fills it is
        // refused before any work, and a completion stops at it (finish reason `length`).
        let limit = model.config.max_position_embeddings;
        if prompt.len() >= limit {
            return Err(Error::invalid(format!(
                "the prompt is {} tokens; the model's context is {limit} tokens, which leaves no room to generate",
                prompt.len()
            )));
        }
        let max_tokens = req.max_tokens.min(limit - prompt.len());
        let decoder = StreamDecoder::with_context(&prompt);
        // A KV budget this sequence cannot work with is refused here, before any work.
        kv.resolve(prompt.len().saturating_add(max_tokens))?;
        Ok(Generation {
            prompt,
            cache: KvCache::new(0, 0),
            sampler: Sampler::new(req.sampling.clone()),
            decoder,
            stop: req.stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
            max_tokens,
            eos: model.config.eos_token_ids.clone(),
            generated: Vec::new(),
            text: String::new(),
            emitted: 0,
            finish: if max_tokens == 0 {
                Some(FinishReason::Length)
            } else {
                None
            },
            error: None,
            started: Instant::now(),
            prefill_ms: 0.0,
            decode_started: None,
            prefill_chunk: 0,
            prefilled: 0,
            step_tokens: 0,
            penalties: None,
            kv,
        })
    }

    /// Gives the generation `cache` (emptied, with room reserved for the whole completion);
    /// returns the cache it held before.
    pub fn attach_cache(&mut self, engine: &Engine, mut cache: KvCache) -> KvCache {
        cache.clear();
        let tokens = self.prompt.len().saturating_add(self.max_tokens);
        // The eviction plan was checked by `from_tokens`; without one, the cache just grows.
        if engine
            .prepare_cache_with(&self.kv, &mut cache, tokens)
            .is_err()
        {
            engine.reserve_cache(&mut cache, tokens);
        }
        std::mem::replace(&mut self.cache, cache)
    }

    /// Penalizes tokens already seen (see [`Penalties`]) from the next sample on.
    pub fn set_penalties(&mut self, p: Penalties) {
        self.penalties = (!p.is_off()).then(|| PenaltyState::new(p, &self.prompt));
    }

    /// Prefills the prompt at most `tokens` tokens per step (0: all at once), so a long prompt
    /// shares steps with other sequences' decoding instead of stalling them.
    /// Most prompt tokens per step (0: the whole prompt in one step).
    pub fn set_prefill_chunk(&mut self, tokens: usize) {
        self.prefill_chunk = tokens;
    }

    /// Tokens of the prompt.
    pub fn prompt_tokens(&self) -> usize {
        self.prompt.len()
    }

    /// This sequence's KV budget and policy.
    pub fn kv_options(&self) -> &KvOptions {
        &self.kv
    }

    /// Tokens sampled so far.
    pub fn output_tokens(&self) -> usize {
        self.generated.len()
    }

    /// Why the generation ended, once it has.
    pub fn finished(&self) -> Option<FinishReason> {
        self.finish
    }

    /// The next forward step's input: the prompt first, then the last sampled token.
    pub fn batch_item(&mut self) -> BatchItem<'_> {
        let tokens: &[u32] = match self.generated.last() {
            Some(last) => std::slice::from_ref(last),
            None => {
                let rest = &self.prompt[self.prefilled..];
                // A prompt chunk (`prefill_chunk`), and never more than the KV budget's room.
                let n = match self.prefill_chunk {
                    0 => rest.len(),
                    n => n.min(rest.len()),
                };
                &rest[..n.min(self.cache.room())]
            }
        };
        self.step_tokens = tokens.len();
        BatchItem {
            tokens,
            cache: &mut self.cache,
            logits: Logits::Last,
        }
    }

    /// Takes the logits of the step just run; returns the text that became final. Logits no
    /// token can be sampled from end the generation (`FinishReason::Error`) with the error.
    pub fn accept(
        &mut self,
        logits: &[f32],
        tokenizer: &crate::model::tokenizer::Tokenizer,
    ) -> Result<String> {
        if self.generated.is_empty() {
            self.prefilled += self.step_tokens;
            if self.prefilled < self.prompt.len() {
                // A prompt chunk: its logits predict a prompt token, not the next one.
                return Ok(String::new());
            }
            self.prefill_ms = self.started.elapsed().as_secs_f64() * 1e3;
            self.decode_started = Some(Instant::now());
        }
        let sampled = match &self.penalties {
            Some(p) => self.sampler.sample(&p.apply(logits)),
            None => self.sampler.sample(logits),
        };
        let token = match sampled {
            Ok(token) => {
                if let Some(p) = &mut self.penalties {
                    p.push(token);
                }
                token
            }
            Err(e) => {
                self.fail_with(e.to_string());
                return Err(e);
            }
        };
        Ok(self.after_sampling(token, tokenizer))
    }

    /// The bookkeeping after `token` was sampled: stop conditions, text to release.
    fn after_sampling(
        &mut self,
        token: u32,
        tokenizer: &crate::model::tokenizer::Tokenizer,
    ) -> String {
        self.generated.push(token);
        if self.eos.contains(&token) {
            self.finish = Some(FinishReason::Stop);
            self.text.push_str(&self.decoder.finish(tokenizer));
            return self.release(self.text.len());
        }
        self.text.push_str(&self.decoder.push(tokenizer, token));
        if let Some(at) = self
            .stop
            .iter()
            // A stop string cannot start in released text (a possible start is held back), so
            // only the unreleased tail is searched.
            .filter_map(|s| {
                self.text[self.emitted..]
                    .find(s.as_str())
                    .map(|i| i + self.emitted)
            })
            .min()
        {
            self.text.truncate(at);
            self.finish = Some(FinishReason::Stop);
            return self.release(at);
        }
        if self.generated.len() >= self.max_tokens {
            self.finish = Some(FinishReason::Length);
            self.text.push_str(&self.decoder.finish(tokenizer));
            return self.release(self.text.len());
        }
        // Hold back a tail that could still become a stop string.
        let held = self
            .stop
            .iter()
            .map(|s| partial_suffix(&self.text, s))
            .max()
            .unwrap_or(0);
        let mut safe = self.text.len() - held;
        while !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        self.release(safe)
    }

    /// Restarts the prompt clock (a server calls this when the request leaves the queue, so
    /// `prefill_ms` measures the model, not the wait).
    pub fn start_clock(&mut self) {
        self.started = Instant::now();
    }

    /// Ends the generation as [`FinishReason::Cancelled`] (unless it has ended already).
    pub fn cancel(&mut self) {
        if self.finish.is_none() {
            self.finish = Some(FinishReason::Cancelled);
        }
    }

    /// Ends the generation as [`FinishReason::Error`].
    pub fn fail(&mut self) {
        self.finish = Some(FinishReason::Error);
    }

    /// Ends the generation with an error the client is told.
    pub fn fail_with(&mut self, reason: impl Into<String>) {
        self.fail();
        self.error = Some(reason.into());
    }

    /// The prompt's token ids.
    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    fn release(&mut self, upto: usize) -> String {
        let upto = upto.max(self.emitted);
        let piece = self.text[self.emitted..upto].to_string();
        self.emitted = upto;
        piece
    }

    /// The completion so far.
    pub fn output(&self) -> GenerateOutput {
        let decode_ms = self
            .decode_started
            .map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
        // The first sampled token comes from prefill; the rest from decode steps.
        let decoded = self.generated.len().saturating_sub(1);
        GenerateOutput {
            text: self.text[..self.emitted].to_string(),
            prompt_tokens: self.prompt.len(),
            completion_tokens: self.generated.len(),
            finish_reason: self.finish.unwrap_or(FinishReason::Length),
            prefill_ms: self.prefill_ms,
            decode_ms,
            decode_tokens_per_s: if decode_ms > 0.0 {
                decoded as f64 / (decode_ms / 1e3)
            } else {
                0.0
            },
            kv_bytes: self.cache.allocated_bytes(),
            error: self.error.clone(),
        }
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn partial_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&n| stop.is_char_boundary(n) && text.ends_with(&stop[..n]))
        .unwrap_or(0)
}

/// Runs one completion to the end. `on_text` is called after every step with the text that
/// became final (often empty) and may return false to stop.
pub fn generate(
    engine: &Engine,
    req: &GenerateRequest,
    on_text: impl FnMut(&str) -> bool,
) -> Result<GenerateOutput> {
    run(engine, Generation::new(engine, req)?, on_text)
}

/// Runs a prepared generation to the end, as [`generate`] does.
pub fn run(
    engine: &Engine,
    mut g: Generation,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<GenerateOutput> {
    let tokenizer = &engine.model().tokenizer;
    while g.finished().is_none() {
        let logits = engine.forward(&mut [g.batch_item()])?;
        let piece = g.accept(&logits[0], tokenizer)?;
        if !on_text(&piece) {
            g.cancel();
        }
    }
    Ok(g.output())
}

#[cfg(test)]
mod tests {
    use super::partial_suffix;

    #[test]
    fn partial_suffix_finds_overlap() {
        assert_eq!(partial_suffix("hello\n", "\n\n"), 1);
        assert_eq!(partial_suffix("hello", "\n\n"), 0);
        assert_eq!(partial_suffix("abc", "bcd"), 2);
    }
}
