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

#[derive(Debug, Clone, Copy, PartialEq)]
enum Variant {
    Plain,
    /// 4 channels ×50 at the norms before attention and the experts.
    NormOutliers,
    /// 2 intermediate channels per expert ×100 at w2's input.
    FfnOutliers,
}

fn table(variant: Variant) -> Vec<(String, f64)> {
    let load = || {
        let mut m = Model::load(&dir()).unwrap();
        match variant {
            Variant::Plain => {}
            Variant::NormOutliers => {
                let ch = outliers::default_channels(m.config.hidden_size);
                outliers::inject(&mut m, &ch, 50.0);
            }
            Variant::FfnOutliers => {
                let ch = outliers::default_ffn_channels(m.config.expert_ffn);
                outliers::inject_ffn(&mut m, &ch, 100.0);
            }
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
    eprintln!("{variant:?}:");
    for (name, p) in &rows {
        eprintln!(
            "  {name:>6}: ppl {p:.4} ({:+.3}%)",
            (p / rows[0].1 - 1.0) * 100.0
        );
    }
    rows
}

/// haq's loss over f32 stays under 0.1% (the bound); the fixture's own loss is ~0.01%.
fn assert_haq_close(rows: &[(String, f64)]) {
    let (f32_ppl, haq) = (rows[0].1, rows[4].1);
    assert!(haq / f32_ppl - 1.0 < 0.001, "haq {haq} vs f32 {f32_ppl}");
}

#[test]
fn haq_stays_within_a_tenth_of_a_percent_of_f32() {
    assert_haq_close(&table(Variant::Plain));
}

/// Rounding must lose clearly more than haq on an outlier variant: the sign that activations
/// really are int8 (f32 activations would not notice the outliers).
fn assert_rounding_breaks(rows: &[(String, f64)]) {
    let (f32_ppl, rtn, haq) = (rows[0].1, rows[1].1, rows[4].1);
    let (rtn_loss, haq_loss) = (rtn / f32_ppl - 1.0, haq / f32_ppl - 1.0);
    assert!(
        rtn_loss > 0.005 && rtn_loss > 10.0 * haq_loss.max(0.0),
        "rtn should degrade clearly: {rtn} vs {f32_ppl}, haq {haq}"
    );
}

#[test]
fn norm_outliers_break_rounding_but_not_haq() {
    let rows = table(Variant::NormOutliers);
    assert_rounding_breaks(&rows);
    assert_haq_close(&rows);
}

#[test]
fn ffn_outliers_break_rounding_but_not_haq() {
    let rows = table(Variant::FfnOutliers);
    assert_rounding_breaks(&rows);
    assert_haq_close(&rows);
}

/// The rotation alone (every linear kept f32) is exact: the same perplexity to float rounding,
/// while the weights really changed (the head is untied, the MLPs read a Hadamard transform).
#[test]
fn rotation_leaves_the_f32_model_unchanged() {
    let m = Model::load(&dir()).unwrap();
    let tokens = m
        .tokenizer
        .encode(
            &std::fs::read_to_string(dir().join("heldout.txt")).unwrap(),
            false,
        )
        .unwrap();
    let (held, calib) = (&tokens[..1024], &tokens[1024..1536]);
    let opts = QuantOptions {
        threads: 2,
        rotate: true,
        keep_f32: vec![String::new()],
        head: quant::HeadQuant::F32,
        ..QuantOptions::new(Method::Rtn, &m)
    };
    let (rotated, summary) = quant::quantize(m, calib, 256, &opts, |_, _, _| {}).unwrap();
    assert_eq!(summary.linears, 0);
    assert!(rotated.config.ffn_hadamard_block.is_some());
    assert!(rotated.weights.lm_head.is_some() && !rotated.config.tie_word_embeddings);
    let (want, got) = (ppl(Model::load(&dir()).unwrap(), held), ppl(rotated, held));
    assert!(
        (got / want - 1.0).abs() < 1e-5,
        "rotated {got} vs f32 {want}"
    );
}
