//! W8A8 accuracy on the trained fixture's held-out text (ctx 256): every method against f32,
//! and the outlier variant where plain rounding must degrade and smoothing + GPTQ must not.
//! Accuracy, not speed: these assert perplexity ratios, never timings.

use edgemoe::engine::ppl::perplexity;
use edgemoe::quant::{self, outliers, Method, QuantOptions};
use edgemoe::{Engine, Model};
use std::path::PathBuf;
use std::sync::Arc;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trained-moe")
}

fn ppl(model: Model, tokens: &[u32]) -> f64 {
    let engine = Engine::new(Arc::new(model), 2).unwrap();
    perplexity(&engine, tokens, 256, |_, _| {}).unwrap().ppl
}

fn table(outlier: bool) -> Vec<(String, f64)> {
    let load = || {
        let mut m = Model::load(&dir()).unwrap();
        if outlier {
            let ch = outliers::default_channels(m.config.hidden_size);
            outliers::inject(&mut m, &ch, 50.0);
        }
        m
    };
    let probe = load();
    let held = probe
        .tokenizer
        .encode(
            &std::fs::read_to_string(dir().join("heldout.txt")).unwrap(),
            false,
        )
        .unwrap();
    let calib = probe
        .tokenizer
        .encode(
            &std::fs::read_to_string(dir().join("calib.txt")).unwrap(),
            false,
        )
        .unwrap();
    let calib = &calib[..calib.len().min(8192)];
    // Half the held-out windows keep the test quick; every method sees the same ones.
    let held = &held[..held.len() / 2];
    let mut rows = vec![("f32".to_string(), ppl(probe, held))];
    for method in [Method::Rtn, Method::Smooth, Method::Gptq, Method::Haq] {
        let m = load();
        let opts = QuantOptions {
            threads: 2,
            ..QuantOptions::new(method, &m)
        };
        let (q, _) = quant::quantize(m, calib, 256, &opts, |_, _, _| {}).unwrap();
        rows.push((format!("{method:?}").to_lowercase(), ppl(q, held)));
    }
    eprintln!("outliers {outlier}:");
    for (name, p) in &rows {
        eprintln!(
            "  {name:>6}: ppl {p:.4} ({:+.3}%)",
            (p / rows[0].1 - 1.0) * 100.0
        );
    }
    rows
}

#[test]
fn haq_stays_within_half_a_percent_of_f32() {
    let rows = table(false);
    let (f32_ppl, haq) = (rows[0].1, rows[4].1);
    assert!(haq / f32_ppl - 1.0 < 0.005, "haq {haq} vs f32 {f32_ppl}");
}

#[test]
fn outliers_break_rounding_but_not_haq() {
    let rows = table(true);
    let (f32_ppl, rtn, haq) = (rows[0].1, rows[1].1, rows[4].1);
    // On this small model rounding loses ~1% (not the "several percent" of large LLMs), still
    // more than ten times what smoothing + GPTQ loses.
    let (rtn_loss, haq_loss) = (rtn / f32_ppl - 1.0, haq / f32_ppl - 1.0);
    assert!(
        rtn_loss > 0.005 && rtn_loss > 10.0 * haq_loss,
        "rtn should degrade clearly: {rtn} vs {f32_ppl}, haq {haq}"
    );
    assert!(haq_loss < 0.01, "haq {haq} vs f32 {f32_ppl}");
}
