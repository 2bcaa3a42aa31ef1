//! The smallest program on edgemoe's Rust API: load the built-in model (embedded in the
//! library), build an engine, and print a completion as it is generated.
//!
//! `cargo run --release --example generate -- "And God said"`

use edgemoe::{EngineBuilder, GenerateRequest, SamplingParams};
use std::io::Write;
use std::sync::Arc;

fn main() -> edgemoe::Result<()> {
    let prompt = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "And God said".into());
    // `None`: the built-in trained model; a path loads a checkpoint, .gguf or .emoe instead.
    let model = Arc::new(edgemoe::load_model(None)?);
    let engine = EngineBuilder::new(model).build()?;
    let req = GenerateRequest {
        prompt: prompt.clone(),
        max_tokens: 40,
        sampling: SamplingParams {
            temperature: 0.7,
            seed: 1,
            ..SamplingParams::default()
        },
        stop: vec![],
    };
    print!("{prompt}");
    let mut stream = engine.stream(&req)?;
    for piece in stream.by_ref() {
        print!("{}", piece?);
        let _ = std::io::stdout().flush();
    }
    let out = stream.output();
    println!(
        "\n({} tokens, {:.0} tokens/s, finish reason {:?})",
        out.completion_tokens, out.decode_tokens_per_s, out.finish_reason
    );
    Ok(())
}
