//! W8A8 accuracy on the trained fixture's held-out text (ctx 256): every method against f32,
//! and the outlier variants where plain (unrotated) rounding must degrade and haq, rotated or
//! with the smoothing folds alone, must not.
//! Accuracy, not speed: these assert perplexity ratios, never timings.

use edgemoe::engine::ppl::perplexity;
use edgemoe::quant::{self, outliers, Method, QuantOptions};
use edgemoe::{Engine, Model};
use std::path::PathBuf;
use std::sync::Arc;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trained-moe")
}

fn heldout_tokens(m: &Model) -> Vec<u32> {
    let text = std::fs::read_to_string(dir().join("heldout.txt")).unwrap();
    m.tokenizer.encode(&text, false).unwrap()
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
    table_of("trained-moe", variant)
}

/// f32, then rtn, smooth, gptq (unrotated), haq and haq unrotated, on fixture `name`'s first
/// half of held-out text.
fn table_of(name: &str, variant: Variant) -> Vec<(String, f64)> {
    let load = || {
        let mut m = Model::load(&fixture(name)).unwrap();
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
    let held = tokens_of(&probe, name, "heldout.txt");
    let calib = tokens_of(&probe, name, "calib.txt");
    let calib = &calib[..calib.len().min(8192)];
    // Half the held-out windows keep the test quick; every method sees the same ones.
    let held = &held[..held.len() / 2];
    let mut rows = vec![("f32".to_string(), ppl(probe, held))];
    // The references without rotation (plain rounding must break on the outlier variants: the
    // sign that activations really are int8), haq as it ships (rotated), and haq unrotated (the
    // smoothing folds alone).
    let runs = [
        (Method::Rtn, false),
        (Method::Smooth, false),
        (Method::Gptq, false),
        (Method::Haq, true),
        (Method::Haq, false),
    ];
    for (method, rotate) in runs {
        let m = load();
        let opts = QuantOptions {
            threads: 2,
            rotate,
            ..QuantOptions::new(method, &m)
        };
        let (q, _) = quant::quantize(m, calib, 256, &opts, |_, _, _| {}).unwrap();
        let name = match (method, rotate) {
            (Method::Haq, false) => "haq-norot".to_string(),
            _ => format!("{method:?}").to_lowercase(),
        };
        rows.push((name, ppl(q, held)));
    }
    eprintln!("{name} {variant:?}:");
    for (name, p) in &rows {
        eprintln!(
            "  {name:>6}: ppl {p:.4} ({:+.3}%)",
            (p / rows[0].1 - 1.0) * 100.0
        );
    }
    rows
}

/// haq's loss over f32 stays under 0.1% (the bound), rotated and not; the fixture's own
/// loss is ~0.01%.
fn assert_haq_close(rows: &[(String, f64)]) {
    let (f32_ppl, haq, unrotated) = (rows[0].1, rows[4].1, rows[5].1);
    assert!(haq / f32_ppl - 1.0 < 0.001, "haq {haq} vs f32 {f32_ppl}");
    assert!(
        unrotated / f32_ppl - 1.0 < 0.001,
        "haq unrotated {unrotated} vs f32 {f32_ppl}"
    );
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
    let tokens = heldout_tokens(&m);
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

/// Spilling finished layers to a file (what `edgemoe quantize` does) changes no value: the same
/// perplexity to the last bit as quantizing in memory, with the int8 weights really mapped.
#[test]
fn spilled_layers_quantize_exactly_as_in_memory() {
    let m = Model::load(&dir()).unwrap();
    let tokens = heldout_tokens(&m);
    let (held, calib) = (&tokens[..512], &tokens[512..1536]);
    let spill_dir = tempfile::tempdir().unwrap();
    let quantized = |spill: bool| {
        let m = Model::load(&dir()).unwrap();
        let opts = QuantOptions {
            threads: 2,
            spill_dir: spill.then(|| spill_dir.path().to_path_buf()),
            ..QuantOptions::new(Method::Haq, &m)
        };
        quant::quantize(m, calib, 256, &opts, |_, _, _| {})
            .unwrap()
            .0
    };
    let (in_memory, spilled) = (quantized(false), quantized(true));
    let mapped = |m: &Model| match &m.weights.layers[0].attn.q.weight {
        edgemoe::model::weights::LinearWeight::Int8(w) => w.data.is_mapped(),
        _ => panic!("q_proj is not int8"),
    };
    assert!(!mapped(&in_memory) && mapped(&spilled));
    let (want, got) = (ppl(in_memory, held), ppl(spilled, held));
    assert_eq!(
        got.to_bits(),
        want.to_bits(),
        "spilled {got} vs in memory {want}"
    );
    assert_eq!(std::fs::read_dir(spill_dir.path()).unwrap().count(), 0);
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `file` of fixture `name`'s folder in `m`'s tokenizer.
fn tokens_of(m: &Model, name: &str, file: &str) -> Vec<u32> {
    let text = std::fs::read_to_string(fixture(name).join(file)).unwrap();
    m.tokenizer.encode(&text, false).unwrap()
}

/// haq W8A8 as it ships (default options: rotated, α searched, GPTQ, weight-only int8 head) on
/// the trained Qwen3-MoE and DeepSeek-V3 (tools/train_tiny_moe.py --arch …), calibrated on
/// their calib.txt as the Mixtral is: perplexity on the whole held-out text within +0.3% of
/// f32 (issue 27's bound).
#[test]
fn haq_stays_within_three_tenths_of_a_percent_on_trained_qwen3moe_and_deepseekv3() {
    for name in ["trained-qwen3moe", "trained-deepseekv3"] {
        let m = Model::load(&fixture(name)).unwrap();
        let held = tokens_of(&m, name, "heldout.txt");
        let calib = tokens_of(&m, name, "calib.txt");
        let calib = &calib[..calib.len().min(8192)];
        let opts = QuantOptions {
            threads: 2,
            ..QuantOptions::new(Method::Haq, &m)
        };
        let (q, summary) = quant::quantize(m, calib, 256, &opts, |_, _, _| {}).unwrap();
        assert!(summary.gptq > 0, "{name}: {summary:?}");
        assert!(
            summary
                .rotation
                .as_deref()
                .is_some_and(|r| r.starts_with("residual")),
            "{name}: {:?}",
            summary.rotation
        );
        let want = ppl(Model::load(&fixture(name)).unwrap(), &held);
        let got = ppl(q, &held);
        let loss = got / want - 1.0;
        eprintln!(
            "{name}: f32 ppl {want:.4}, haq {got:.4} ({:+.3}%), {} int8 linears, {} by rounding",
            loss * 100.0,
            summary.linears,
            summary.rtn_fallback.len()
        );
        assert!(loss < 0.003, "{name}: haq {got} vs f32 {want}");
    }
}

/// Latent attention's exact transforms: with every linear kept f32, haq's smoothing folds
/// (into the attention norm, q_a_layernorm and kv_a_layernorm, and o_proj's input through
/// kv_b_proj's value rows) and the rotation (residual stream, and each head's values where
/// v_head_dim is a power of two) leave the logits as they were, while the weights changed.
/// The DeepSeek-V2 fixture has q_proj (no query latent) and 12-wide values, V3 24-wide, V3
/// plain 16, the trained V3 32.
#[test]
fn latent_attention_folds_and_rotation_keep_the_f32_logits() {
    use edgemoe::engine::{BatchItem, Logits};
    use edgemoe::model::weights::Norm;
    let logits = |m: Model, t: &[u32]| {
        let engine = Engine::new(Arc::new(m), 2).unwrap();
        let mut cache = engine.new_cache();
        let item = BatchItem {
            tokens: t,
            cache: &mut cache,
            logits: Logits::All,
        };
        engine.forward(&mut [item]).unwrap().concat()
    };
    let rms = |n: &Norm| match n {
        Norm::Rms { weight, .. } => weight.clone(),
        Norm::Layer { .. } => panic!("not an RMSNorm"),
    };
    for name in [
        "deepseekv2-tiny",
        "deepseekv3-tiny",
        "deepseekv3-tiny-plain",
        "trained-deepseekv3",
    ] {
        for rotate in [false, true] {
            let m = Model::load(&fixture(name)).unwrap();
            let t = tokens_of(&m, "trained-moe", "heldout.txt");
            let (held, calib) = (&t[..64], &t[64..1088]);
            let kv_norm =
                |m: &Model| rms(&m.weights.layers[0].attn.latent.as_ref().unwrap().kv_a_norm);
            let before = kv_norm(&m);
            let opts = QuantOptions {
                threads: 2,
                rotate,
                keep_f32: vec![String::new()],
                head: quant::HeadQuant::F32,
                ..QuantOptions::new(Method::Haq, &m)
            };
            let (q, summary) = quant::quantize(m, calib, 256, &opts, |_, _, _| {}).unwrap();
            assert_eq!(summary.linears, 0);
            assert_eq!(
                summary
                    .rotation
                    .as_deref()
                    .is_some_and(|r| r.starts_with("residual")),
                rotate,
                "{name}: {:?}",
                summary.rotation
            );
            let smoothed = |suffix: &str| summary.alphas.iter().any(|(k, _)| k.ends_with(suffix));
            assert!(
                smoothed(".kv_b_proj") && smoothed(".o_proj") && smoothed(".qkv_in"),
                "{name}: {:?}",
                summary.alphas
            );
            let has_q_a = q.weights.layers[0]
                .attn
                .latent
                .as_ref()
                .unwrap()
                .q_a
                .is_some();
            assert_eq!(smoothed(".q_b_proj"), has_q_a, "{name}");
            assert_ne!(kv_norm(&q), before, "{name}: kv_a_layernorm unchanged");
            let got = logits(q, held);
            let want = logits(Model::load(&fixture(name)).unwrap(), held);
            let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
            let worst = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            eprintln!("{name} rotate {rotate}: max |logit| {scale:.3}, max difference {worst:.2e}");
            assert!(
                worst <= 1e-4 * scale,
                "{name} rotate {rotate}: {worst} of {scale}"
            );
        }
    }
}

/// The outlier variants of the trained Qwen3-MoE and DeepSeek-V3 (×50 at the norms before
/// attention — for DeepSeek what q_a_proj and kv_a_proj_with_mqa read — and the experts; ×100
/// inside every MLP): plain rounding must lose clearly (+2% to +3.3%), haq, rotated or with
/// the smoothing folds alone, stay within issue 27's +0.3%. Under the MLP outliers rotated haq
/// loses more than unrotated (Qwen3-MoE +0.23%, DeepSeek-V3 +0.13%, against about 0): the
/// experts are 32 wide, so the online Hadamard spreads each ×100 channel over 32 only, and the
/// up → down smoothing fold that removes it is off under rotation.
#[test]
fn outliers_break_rounding_but_not_haq_on_trained_qwen3moe_and_deepseekv3() {
    for name in ["trained-qwen3moe", "trained-deepseekv3"] {
        for variant in [Variant::NormOutliers, Variant::FfnOutliers] {
            let rows = table_of(name, variant);
            let (f32_ppl, rtn, haq, unrotated) = (rows[0].1, rows[1].1, rows[4].1, rows[5].1);
            assert!(
                rtn / f32_ppl - 1.0 > 0.005,
                "{name} {variant:?}: rtn {rtn} vs {f32_ppl}"
            );
            assert!(
                haq / f32_ppl - 1.0 < 0.003,
                "{name} {variant:?}: haq {haq} vs {f32_ppl}"
            );
            assert!(
                unrotated / f32_ppl - 1.0 < 0.003,
                "{name} {variant:?}: haq unrotated {unrotated} vs {f32_ppl}"
            );
        }
    }
}
