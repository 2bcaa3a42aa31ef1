//! Perplexity of every quantization method on the trained fixture's held-out text (ctx 256),
//! plain and with injected activation outliers; and the choices the quantizer makes (smoothing
//! of un-normed inputs, α auto). `cargo bench --bench quant_accuracy` prints markdown tables.

use edgemoe::engine::ppl::perplexity;
use edgemoe::quant::{self, outliers, Method, QuantOptions};
use edgemoe::{Engine, Model};
use std::path::PathBuf;
use std::sync::Arc;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trained-moe")
}

fn load(outlier: bool) -> Model {
    let mut m = Model::load(&dir()).expect("trained fixture");
    if outlier {
        let ch = outliers::default_channels(m.config.hidden_size);
        outliers::inject(&mut m, &ch, 50.0);
    }
    m
}

fn ppl(model: Model, tokens: &[u32]) -> f64 {
    let engine = Engine::new(Arc::new(model), 0).expect("engine");
    perplexity(&engine, tokens, 256, |_, _| {})
        .expect("ppl")
        .ppl
}

/// A change to the default quantization options.
type Tweak = dyn Fn(&mut QuantOptions);

fn main() {
    let probe = load(false);
    let read = |f: &str| std::fs::read_to_string(dir().join(f)).expect("fixture text");
    let held = probe
        .tokenizer
        .encode(&read("heldout.txt"), false)
        .expect("tokenize");
    let calib = probe
        .tokenizer
        .encode(&read("calib.txt"), false)
        .expect("tokenize");
    let calib = &calib[..calib.len().min(16384)];
    let quantized = |outlier: bool, tweak: &dyn Fn(&mut QuantOptions), method: Method| {
        let m = load(outlier);
        let mut opts = QuantOptions::new(method, &m);
        tweak(&mut opts);
        let (q, _) = quant::quantize(m, calib, 256, &opts, |_, _, _| {}).expect("quantize");
        ppl(q, &held)
    };
    println!(
        "held-out: {} tokens, ctx 256; calibration: {} tokens of Psalms (training part)\n",
        held.len(),
        calib.len()
    );
    println!("| method | ppl | vs f32 | ppl (outliers ×50) | vs f32 |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let base = [ppl(load(false), &held), ppl(load(true), &held)];
    println!("| f32 | {:.4} | | {:.4} | |", base[0], base[1]);
    for method in [Method::Rtn, Method::Smooth, Method::Gptq, Method::Haq] {
        let p = [
            quantized(false, &|_| {}, method),
            quantized(true, &|_| {}, method),
        ];
        println!(
            "| {method:?} | {:.4} | {:+.3}% | {:.4} | {:+.3}% |",
            p[0],
            (p[0] / base[0] - 1.0) * 100.0,
            p[1],
            (p[1] / base[1] - 1.0) * 100.0
        );
    }
    println!("\nhaq variants (outlier model):\n");
    println!("| variant | ppl | vs f32 |");
    println!("| --- | ---: | ---: |");
    let variants: [(&str, &Tweak); 4] = [
        ("default (α 0.8, o/w2 inputs unsmoothed)", &|_| {}),
        ("o/w2 inputs smoothed (input scale in the kernel)", &|o| {
            o.smooth_unnormed = true
        }),
        ("α auto", &|o| o.alpha = None),
        ("act-order", &|o| o.act_order = true),
    ];
    for (name, tweak) in variants {
        let p = quantized(true, tweak, Method::Haq);
        println!("| {name} | {p:.4} | {:+.3}% |", (p / base[1] - 1.0) * 100.0);
    }
}
