//! The continuous-batching scheduler both `serve` front ends (JSON lines, HTTP) drive.
//!
//! Requests wait in a bounded queue holding no KV memory; between decode steps the scheduler
//! admits them into the batch (taking a recycled cache then), runs one batched forward step over
//! every active request, hands each its logits and reports text and completions through a
//! callback. A front end's per-request data rides along as the tag `T`.

use crate::engine::generation::{FinishReason, GenerateOutput, Generation};
use crate::engine::Engine;
use crate::kv::KvCache;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

pub struct SchedulerOptions {
    /// Most requests decoded together in one step; the rest wait in arrival order.
    pub max_batch: usize,
    /// Most requests waiting for a place in the batch; more are refused at once.
    pub max_queue: usize,
    /// Most prompt tokens a request prefills per step (0: a whole prompt in one step).
    pub prefill_chunk: usize,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        SchedulerOptions {
            max_batch: 16,
            max_queue: 256,
            prefill_chunk: 256,
        }
    }
}

/// What the scheduler reports about a request.
pub enum Event<'a> {
    /// Text that became final this step (never empty).
    Text(&'a str),
    /// The request ended; its last event.
    Done(&'a GenerateOutput),
}

struct Job<T> {
    tag: T,
    gen: Generation,
}

/// Counters for `/metrics` and the `stats` op, since the scheduler started.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Counters {
    pub finished_stop: u64,
    pub finished_length: u64,
    pub finished_cancelled: u64,
    pub finished_error: u64,
    pub rejected_queue_full: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub steps: u64,
    /// KV-cache evictions of finished requests (see `KvCache::eviction`).
    pub kv_evictions: u64,
}

pub struct Scheduler<'e, T> {
    engine: &'e Engine,
    opts: SchedulerOptions,
    active: Vec<Job<T>>,
    waiting: VecDeque<Job<T>>,
    /// KV caches of finished requests, emptied and kept for the next ones (at most
    /// `max_batch`): their memory is already mapped, so decoding takes no page faults.
    spare_caches: Vec<KvCache>,
    pub counters: Counters,
    /// Tokens generated per recent step, for the tokens/s gauge.
    recent: VecDeque<(Instant, usize)>,
}

/// The text of a caught panic.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// The window the tokens/s gauge averages over.
const RATE_WINDOW: Duration = Duration::from_secs(10);

impl<'e, T> Scheduler<'e, T> {
    pub fn new(engine: &'e Engine, mut opts: SchedulerOptions) -> Self {
        opts.max_batch = opts.max_batch.max(1);
        Scheduler {
            engine,
            opts,
            active: Vec::new(),
            waiting: VecDeque::new(),
            spare_caches: Vec::new(),
            counters: Counters::default(),
            recent: VecDeque::new(),
        }
    }

    pub fn engine(&self) -> &'e Engine {
        self.engine
    }

    pub fn is_idle(&self) -> bool {
        self.active.is_empty() && self.waiting.is_empty()
    }

    pub fn active_len(&self) -> usize {
        self.active.len()
    }

    pub fn queue_depth(&self) -> usize {
        self.waiting.len()
    }

    /// Each running request's tag and generation (its KV cache and options).
    pub fn running(&self) -> impl Iterator<Item = (&T, &Generation)> {
        self.active.iter().map(|j| (&j.tag, &j.gen))
    }

    /// Every request in flight (running or waiting), by tag.
    pub fn tags(&self) -> impl Iterator<Item = &T> {
        self.active.iter().chain(&self.waiting).map(|j| &j.tag)
    }

    /// Queues a request; a full queue gives the tag back at once. A generation already
    /// finished (`max_tokens` 0) is reported done without queueing.
    pub fn submit(
        &mut self,
        tag: T,
        gen: Generation,
        emit: &mut impl FnMut(&mut T, Event) -> bool,
    ) -> Result<(), T> {
        if gen.finished().is_some() {
            self.finish(Job { tag, gen }, emit);
            return Ok(());
        }
        // Requests the next step admits into free batch places do not count as queued.
        let free = self.opts.max_batch.saturating_sub(self.active.len());
        if self.waiting.len() >= self.opts.max_queue + free {
            self.counters.rejected_queue_full += 1;
            return Err(tag);
        }
        self.waiting.push_back(Job { tag, gen });
        Ok(())
    }

    /// Cancels the first request in flight whose tag matches; false when none does.
    pub fn cancel(
        &mut self,
        matches: impl Fn(&T) -> bool,
        emit: &mut impl FnMut(&mut T, Event) -> bool,
    ) -> bool {
        let job = if let Some(i) = self.active.iter().position(|j| matches(&j.tag)) {
            self.active.remove(i)
        } else if let Some(i) = self.waiting.iter().position(|j| matches(&j.tag)) {
            match self.waiting.remove(i) {
                Some(j) => j,
                None => return false,
            }
        } else {
            return false;
        };
        let mut job = job;
        job.gen.cancel();
        self.finish(job, emit);
        true
    }

    /// Moves waiting requests into the batch, giving each its KV memory now.
    fn admit(&mut self) {
        while self.active.len() < self.opts.max_batch {
            let Some(mut job) = self.waiting.pop_front() else {
                break;
            };
            let cache = self
                .spare_caches
                .pop()
                .unwrap_or_else(|| self.engine.new_cache());
            job.gen.attach_cache(self.engine, cache);
            job.gen.set_prefill_chunk(self.opts.prefill_chunk);
            job.gen.start_clock();
            self.active.push(job);
        }
    }

    /// Admits what fits, then runs one batched forward step over every active request. `emit`
    /// gets each request's new text and its end; returning false cancels that request (its
    /// client went away).
    ///
    /// One request's failure ends that request only: a panic while sampling or decoding its
    /// token fails it alone, and when the batched forward step fails (an error or a panic), every
    /// cache is rewound to before the step and each request is retried alone, so only those that
    /// fail by themselves end, each with the error.
    pub fn step(&mut self, emit: &mut impl FnMut(&mut T, Event) -> bool) {
        self.admit();
        let engine = self.engine;
        // A request whose next tokens the model cannot run (an id past the vocabulary, from a
        // tokenizer larger than the model) ends alone instead of failing the whole batch.
        let vocab = engine.model().config.vocab_size;
        for j in &mut self.active {
            if let Some(&bad) = j
                .gen
                .batch_item()
                .tokens
                .iter()
                .find(|&&t| t as usize >= vocab)
            {
                let reason = format!("token id {bad} is outside the vocabulary of {vocab}");
                eprintln!("serve: a request failed: {reason}");
                j.gen.fail_with(reason);
            }
        }
        // After a sticky device failure every step would fail: end the requests with the reason.
        if let Some(reason) = crate::backend::health::unusable() {
            for j in &mut self.active {
                j.gen.fail_with(reason.to_string());
            }
        }
        self.retire(emit);
        if self.active.is_empty() {
            return;
        }
        let marks: Vec<_> = self.active.iter().map(|j| j.gen.cache.mark()).collect();
        let all: Vec<usize> = (0..self.active.len()).collect();
        let result = self.forward(&all);
        self.counters.steps += 1;
        let mut generated = 0;
        match result {
            Ok(logits) => {
                for (i, l) in logits.iter().enumerate() {
                    generated += self.deliver(i, l, emit);
                }
            }
            Err(reason) if self.active.len() == 1 => self.fail_broken(0, &reason),
            Err(reason) => {
                eprintln!(
                    "serve: a batched step failed ({reason}); retrying its {} requests one at a time",
                    self.active.len()
                );
                for (i, mark) in marks.iter().enumerate() {
                    if !self.active[i].gen.cache.rewind(mark) {
                        self.fail_broken(
                            i,
                            &format!("the batch it ran in failed ({reason}) and its KV cache could not be restored"),
                        );
                        continue;
                    }
                    match self.forward(&[i]) {
                        Ok(l) => generated += self.deliver(i, &l[0], emit),
                        Err(reason) => self.fail_broken(i, &reason),
                    }
                }
            }
        }
        self.note_rate(generated);
        self.retire(emit);
    }

    /// One forward step over the active requests `which`; a panic becomes an error.
    fn forward(&mut self, which: &[usize]) -> Result<Vec<Vec<f32>>, String> {
        let engine = self.engine;
        #[cfg(test)]
        let injected = which
            .iter()
            .find_map(|&i| super::fault::in_forward(engine, &self.active[i].gen));
        let mut items: Vec<_> = self
            .active
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| which.contains(i))
            .map(|(_, j)| j.gen.batch_item())
            .collect();
        let result = catch_unwind(AssertUnwindSafe(|| {
            let logits = engine.forward(&mut items);
            #[cfg(test)]
            super::fault::after_forward(injected)?;
            logits
        }));
        match result {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(payload) => Err(format!("internal error: {}", panic_message(&*payload))),
        }
    }

    /// Samples request `i`'s next token from `logits` and reports its text; a panic there
    /// ends this request only. Returns the tokens it generated (0 or 1).
    fn deliver(
        &mut self,
        i: usize,
        logits: &[f32],
        emit: &mut impl FnMut(&mut T, Event) -> bool,
    ) -> usize {
        let tokenizer = &self.engine.model().tokenizer;
        #[cfg(test)]
        let engine = self.engine;
        let job = &mut self.active[i];
        let before = job.gen.output_tokens();
        let r = catch_unwind(AssertUnwindSafe(|| {
            #[cfg(test)]
            super::fault::in_sampling(engine, &job.gen);
            // A request whose logits cannot be sampled ends alone, with an error.
            match job.gen.accept(logits, tokenizer) {
                Ok(piece) => {
                    if !piece.is_empty() && !emit(&mut job.tag, Event::Text(&piece)) {
                        job.gen.cancel();
                    }
                }
                Err(e) => eprintln!("serve: a request failed: {e}"),
            }
        }));
        if let Err(payload) = r {
            self.fail_broken(i, &format!("internal error: {}", panic_message(&*payload)));
            return 0;
        }
        self.active[i].gen.output_tokens() - before
    }

    /// Fails active request `i` with `reason`; its cache may be half-written, so it is dropped
    /// rather than recycled.
    fn fail_broken(&mut self, i: usize, reason: &str) {
        eprintln!("serve: a request failed: {reason}");
        let gen = &mut self.active[i].gen;
        gen.fail_with(reason);
        gen.attach_cache(self.engine, KvCache::new(0, 0));
    }

    /// Finishes the active requests that are done.
    fn retire(&mut self, emit: &mut impl FnMut(&mut T, Event) -> bool) {
        let (done, still): (Vec<_>, Vec<_>) = std::mem::take(&mut self.active)
            .into_iter()
            .partition(|j| j.gen.finished().is_some());
        self.active = still;
        for job in done {
            self.finish(job, emit);
        }
    }

    fn note_rate(&mut self, tokens: usize) {
        let now = Instant::now();
        self.recent.push_back((now, tokens));
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            self.recent.pop_front();
        }
    }

    /// Tokens generated per second over the last few seconds.
    pub fn tokens_per_s(&self) -> f64 {
        let Some((first, _)) = self.recent.front() else {
            return 0.0;
        };
        let span = first.elapsed().as_secs_f64().max(1.0);
        self.recent.iter().map(|(_, n)| *n).sum::<usize>() as f64 / span
    }

    /// Bytes every KV cache holds (running requests' and spare ones).
    pub fn kv_bytes(&self) -> usize {
        self.active
            .iter()
            .map(|j| j.gen.cache.allocated_bytes())
            .sum::<usize>()
            + self
                .spare_caches
                .iter()
                .map(KvCache::allocated_bytes)
                .sum::<usize>()
    }

    /// Reports a request's end and keeps its cache for a later request.
    fn finish(&mut self, mut job: Job<T>, emit: &mut impl FnMut(&mut T, Event) -> bool) {
        let out = job.gen.output();
        let c = &mut self.counters;
        match out.finish_reason {
            FinishReason::Stop => c.finished_stop += 1,
            FinishReason::Length => c.finished_length += 1,
            FinishReason::Cancelled => c.finished_cancelled += 1,
            FinishReason::Error => c.finished_error += 1,
        }
        c.prompt_tokens += out.prompt_tokens as u64;
        c.completion_tokens += out.completion_tokens as u64;
        c.kv_evictions += job.gen.cache.eviction().map_or(0, |e| e.evictions) as u64;
        emit(&mut job.tag, Event::Done(&out));
        let cache = job.gen.into_cache();
        if self.spare_caches.len() < self.opts.max_batch && cache.allocated_bytes() > 0 {
            self.spare_caches.push(cache);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::generation::{GenerateOutput, GenerateRequest};
    use crate::engine::sampling::SamplingParams;
    use crate::model::Model;
    use std::sync::Arc;

    fn req() -> GenerateRequest {
        GenerateRequest {
            prompt: String::new(),
            max_tokens: 12,
            sampling: SamplingParams {
                temperature: 0.9,
                seed: 4,
                ..SamplingParams::default()
            },
            stop: vec![],
        }
    }

    /// Runs `prompts` batched to the end; each request's (finish reason, text).
    fn run(engine: &Engine, prompts: &[Vec<u32>]) -> Vec<(FinishReason, String)> {
        run_outputs(engine, prompts)
            .into_iter()
            .map(|o| (o.finish_reason, o.text))
            .collect()
    }

    /// Runs `prompts` batched to the end; each request's output.
    fn run_outputs(engine: &Engine, prompts: &[Vec<u32>]) -> Vec<GenerateOutput> {
        let mut s: Scheduler<usize> = Scheduler::new(
            engine,
            SchedulerOptions {
                prefill_chunk: 3,
                ..SchedulerOptions::default()
            },
        );
        let mut done = vec![None; prompts.len()];
        let mut emit = |i: &mut usize, ev: Event| {
            if let Event::Done(out) = ev {
                done[*i] = Some(out.clone());
            }
            true
        };
        for (i, p) in prompts.iter().enumerate() {
            let g = Generation::from_tokens(engine, p.clone(), &req()).unwrap();
            assert!(s.submit(i, g, &mut emit).is_ok());
        }
        while !s.is_idle() {
            s.step(&mut emit);
        }
        done.into_iter().map(Option::unwrap).collect()
    }

    /// A request with a token id past the vocabulary fails alone; the one batched with it gives
    /// the text it gives by itself.
    #[test]
    fn a_bad_request_fails_alone() {
        let engine = Engine::new(Arc::new(Model::builtin_default()), 1).unwrap();
        let good: Vec<u32> = b"hello there".iter().map(|&b| u32::from(b)).collect();
        let alone = run(&engine, std::slice::from_ref(&good));
        let mixed = run(&engine, &[good.clone(), vec![65, 1 << 30, 66], good]);
        assert_eq!(alone[0].0, FinishReason::Length);
        assert_eq!(mixed[1].0, FinishReason::Error);
        assert_eq!(mixed[0], alone[0]);
        assert_eq!(mixed[2], alone[0]);
    }

    fn bytes(s: &str) -> Vec<u32> {
        s.bytes().map(u32::from).collect()
    }

    /// A panic while sampling one request, and a batched forward step that panics or fails
    /// because of one request (after writing every cache), each end that request alone, with
    /// the reason; the others give exactly the text they give by themselves.
    #[test]
    fn an_injected_fault_ends_only_its_request() {
        let engine = Engine::new(Arc::new(Model::builtin_default()), 1).unwrap();
        let (a, b) = (bytes("hello there"), bytes("once upon a time"));
        let alone = [
            run(&engine, std::slice::from_ref(&a)),
            run(&engine, std::slice::from_ref(&b)),
        ];
        for marker in [
            "<fault:sample>",
            "<fault:forward-panic>",
            "<fault:forward-error>",
        ] {
            let bad = bytes(&format!("{marker} and so on"));
            let out = run_outputs(&engine, &[a.clone(), bad.clone(), b.clone(), bad]);
            for faulted in [&out[1], &out[3]] {
                assert_eq!(faulted.finish_reason, FinishReason::Error, "{marker}");
                let why = faulted.error.as_deref().unwrap_or("");
                assert!(why.contains("injected fault"), "{marker}: {why:?}");
                // It ran (and generated) until the fault.
                assert!(faulted.completion_tokens >= 2, "{marker}");
            }
            assert_eq!(
                (out[0].finish_reason, out[0].text.clone()),
                alone[0][0],
                "{marker}"
            );
            assert_eq!(
                (out[2].finish_reason, out[2].text.clone()),
                alone[1][0],
                "{marker}"
            );
        }
    }

    /// A budgeted request that gets the recycled cache of a longer, unbudgeted one holds only
    /// its budget: the cache gives the rest back.
    #[test]
    fn a_recycled_cache_shrinks_to_a_requests_budget() {
        use crate::kv::{plan::bytes_per_token, Budget, KvOptions, Policy};
        let engine = Engine::new(Arc::new(Model::builtin_default()), 1).unwrap();
        let mut s: Scheduler<u32> = Scheduler::new(&engine, SchedulerOptions::default());
        let mut emit = |_: &mut u32, _: Event| true;
        let long = GenerateRequest {
            max_tokens: 80,
            ..req()
        };
        let g = Generation::from_tokens(&engine, vec![1, 2, 3], &long).unwrap();
        assert!(s.submit(0, g, &mut emit).is_ok());
        while !s.is_idle() {
            s.step(&mut emit);
        }
        let cfg = &engine.model().config;
        let full = bytes_per_token(cfg.num_layers, cfg.kv_layout(), Policy::Full) as usize;
        assert_eq!(
            s.kv_bytes(),
            83 * full,
            "the finished request's cache is kept"
        );
        let kv = KvOptions {
            policy: Policy::Lazy,
            budget: Some(Budget::Tokens(30)),
            window: 8,
            sinks: 4,
            ..KvOptions::default()
        };
        let g = Generation::from_tokens_with_kv(&engine, vec![1, 2, 3], &long, kv).unwrap();
        assert!(s.submit(1, g, &mut emit).is_ok());
        s.step(&mut emit);
        let lazy = bytes_per_token(cfg.num_layers, cfg.kv_layout(), Policy::Lazy) as usize;
        let (_, gen) = s.running().next().unwrap();
        assert_eq!(gen.cache.allocated_bytes(), 30 * lazy);
        while !s.is_idle() {
            s.step(&mut emit);
        }
    }

    #[test]
    fn a_full_queue_refuses_at_once() {
        let engine = Engine::new(Arc::new(Model::builtin_default()), 1).unwrap();
        let mut s: Scheduler<u32> = Scheduler::new(
            &engine,
            SchedulerOptions {
                max_batch: 1,
                max_queue: 2,
                prefill_chunk: 0,
            },
        );
        let mut emit = |_: &mut u32, _: Event| true;
        let g = || Generation::from_tokens(&engine, vec![1, 2], &req()).unwrap();
        // One place in the batch and two in the queue.
        for i in 0..3 {
            assert!(s.submit(i, g(), &mut emit).is_ok());
        }
        assert_eq!(s.submit(3, g(), &mut emit).err(), Some(3));
        assert_eq!(s.counters.rejected_queue_full, 1);
        // Queued requests hold no KV memory until admitted.
        assert_eq!(s.kv_bytes(), 0);
        s.step(&mut emit);
        assert!(s.kv_bytes() > 0);
        assert_eq!((s.active_len(), s.queue_depth()), (1, 2));
        assert_eq!(s.submit(4, g(), &mut emit).err(), Some(4));
    }
}
