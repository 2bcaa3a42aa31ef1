//! Serving from inside another program: bind edgemoe's OpenAI-compatible HTTP server to a port
//! the OS picks, print its address, then load the built-in model and serve until killed.
//!
//! `cargo run --release --example embed_server`, then for example
//! `curl -s http://ADDR/v1/completions -d '{"prompt": "And God said", "max_tokens": 20}'`

use edgemoe::serve::http::{HttpOptions, HttpServer};
use edgemoe::EngineBuilder;
use std::sync::Arc;

fn main() -> anyhow::Result<()> {
    let server = HttpServer::bind(HttpOptions {
        addr: "127.0.0.1:0".into(),
        ..HttpOptions::default()
    })?;
    println!("http://{}", server.addr());
    // Requests that arrive while the model loads are answered 503 (`/health` says "loading").
    server.serve(|| {
        let model = Arc::new(edgemoe::load_model(None)?);
        let engine = EngineBuilder::new(model).threads(2).build()?;
        Ok((engine, None))
    })
}
