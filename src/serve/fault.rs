//! Test-only fault injection for the scheduler's failure isolation (compiled into the library's
//! own tests only, so no request can reach it in a real build). A prompt carrying one of the
//! markers below fails, from its third generated token on, in the way the marker names:
//!
//! - `<fault:sample>`: a panic while its token is sampled and decoded;
//! - `<fault:forward-panic>`: a panic in any forward step it is part of (after the step wrote
//!   every sequence's KV cache);
//! - `<fault:forward-error>`: an error from any forward step it is part of.

use crate::engine::generation::Generation;
use crate::engine::Engine;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    ForwardPanic,
    ForwardError,
}

fn marked(engine: &Engine, gen: &Generation, marker: &str) -> bool {
    gen.output_tokens() >= 2
        && engine
            .model()
            .tokenizer
            .decode(gen.prompt())
            .contains(marker)
}

/// The fault a forward step that includes `gen` is to suffer.
pub fn in_forward(engine: &Engine, gen: &Generation) -> Option<Fault> {
    if marked(engine, gen, "<fault:forward-panic>") {
        Some(Fault::ForwardPanic)
    } else if marked(engine, gen, "<fault:forward-error>") {
        Some(Fault::ForwardError)
    } else {
        None
    }
}

/// Runs after the real forward step, so the caches hold what the step wrote.
pub fn after_forward(fault: Option<Fault>) -> Result<()> {
    match fault {
        Some(Fault::ForwardPanic) => panic!("injected fault in the forward step"),
        Some(Fault::ForwardError) => Err(Error::invalid("injected fault in the forward step")),
        None => Ok(()),
    }
}

/// Panics where `gen` asks for a fault while sampling.
pub fn in_sampling(engine: &Engine, gen: &Generation) {
    if marked(engine, gen, "<fault:sample>") {
        panic!("injected fault while sampling");
    }
}
