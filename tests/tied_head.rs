//! A model whose head is tied to its embeddings stays tied through quantization, rotated or
//! not: one `vocab × hidden` matrix, looked up and used as the head, with the final norm's
//! weight moved into `R·diag(γ)·Rᵀ` ahead of the head when rotated. Checked against the f32
//! model and against the layout quantize wrote before (the head untied into its own matrix
//! `E·diag(γ)·Rᵀ`, rounded on its own), on the trained fixture with its head tied to its
//! embeddings and on the tied Llama fixture.

use edgemoe::engine::ppl::perplexity;
use edgemoe::engine::{BatchItem, Engine, Logits};
use edgemoe::model::weights::LinearWeight;
use edgemoe::quant::{self, HeadQuant, Int4Options, Method, QuantOptions};
use edgemoe::Model;
use std::path::PathBuf;
use std::sync::Arc;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The trained fixture with its head replaced by its embedding table (a real, non-random
/// model whose final norm weight is trained: what the rotation moves into the transform).
fn tied_trained() -> Model {
    let mut m = Model::load(&fixture("trained-moe")).unwrap();
    m.weights.lm_head = None;
    m.config.tie_word_embeddings = true;
    m
}

/// The same model in the layout quantize used to write: the head its own copy of the table.
fn untied(mut m: Model) -> Model {
    let mut head = m.weights.embed.clone();
    head.name = "lm_head".into();
    m.weights.lm_head = Some(head);
    m.config.tie_word_embeddings = false;
    m
}

fn tokens(m: &Model) -> Vec<u32> {
    let text = std::fs::read_to_string(fixture("trained-moe/heldout.txt")).unwrap();
    m.tokenizer.encode(&text, false).unwrap()
}

fn logits(model: Arc<Model>, tokens: &[u32]) -> Vec<f32> {
    let engine = Engine::new(model, 2).unwrap();
    let mut cache = engine.new_cache();
    engine
        .forward(&mut [BatchItem {
            tokens,
            cache: &mut cache,
            logits: Logits::All,
        }])
        .unwrap()
        .remove(0)
}

/// Root-mean-square difference over the reference's root-mean-square.
fn relative_rms(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let sq = |it: &mut dyn Iterator<Item = f64>| it.map(|v| v * v).sum::<f64>().sqrt();
    let diff = sq(&mut got.iter().zip(want).map(|(a, b)| (a - b) as f64));
    diff / sq(&mut want.iter().map(|&a| a as f64))
}

fn quantize(m: Model, calib: &[u32], opts: QuantOptions) -> Model {
    quant::quantize(m, calib, 256, &opts, |_, _, _| {})
        .unwrap()
        .0
}

/// The rotation alone (every linear kept f32) keeps a tied model tied and computes the same
/// logits to float rounding, through the head transform.
#[test]
fn rotating_a_tied_model_keeps_it_tied_and_exact() {
    for (name, model) in [
        ("trained, tied", tied_trained as fn() -> Model),
        ("llama-tiny", || {
            Model::load(&fixture("llama-tiny")).unwrap()
        }),
    ] {
        let m = model();
        let toks = tokens(&m);
        let toks: Vec<u32> = toks[..200]
            .iter()
            .map(|&t| t % m.config.vocab_size as u32)
            .collect();
        let opts = QuantOptions {
            threads: 2,
            keep_f32: vec![String::new()],
            head: HeadQuant::F32,
            ..QuantOptions::new(Method::Rtn, &m)
        };
        let (rotated, summary) = quant::quantize(m, &[], 256, &opts, |_, _, _| {}).unwrap();
        assert_eq!(summary.linears, 0, "{name}");
        assert!(rotated.config.tie_word_embeddings && rotated.config.head_transform);
        assert!(rotated.weights.lm_head.is_none(), "{name}: untied");
        let g = rotated.weights.head_transform.as_ref().unwrap();
        let h = rotated.config.hidden_size;
        assert_eq!((g.out_features, g.in_features), (h, h), "{name}");
        let want = logits(Arc::new(model()), &toks);
        let got = logits(Arc::new(rotated), &toks);
        let rel = relative_rms(&got, &want);
        eprintln!("{name}: rotated f32 vs f32 {rel:.2e}");
        assert!(rel < 1e-5, "{name}: {rel}");
    }
}

/// W8A8 with the head weight-only (the default) and W8A8: the tied model keeps one int8 table
/// in the head's form, and its logits are as close to the f32 model's as the untied layout's
/// (both differ from f32 by int8 rounding of the same size).
#[test]
fn the_tied_int8_head_is_as_close_to_f32_as_the_untied_one() {
    let probe = tied_trained();
    let toks = tokens(&probe);
    let (held, calib) = (&toks[..768], &toks[768..768 + 2048]);
    let want = logits(Arc::new(tied_trained()), held);
    let f32_ppl = {
        let e = Engine::new(Arc::new(tied_trained()), 2).unwrap();
        perplexity(&e, held, 256, |_, _| {}).unwrap().ppl
    };
    let int4 = || Int4Options {
        grid: quant::gptq4::Int4Grid {
            group: 32,
            symmetric: true,
        },
        keep_int8: Vec::new(),
        also: vec!["self_attn".into()],
    };
    for (head, bits4) in [
        (HeadQuant::WeightOnly, false),
        (HeadQuant::W8A8, false),
        (HeadQuant::WeightOnly, true),
    ] {
        let opts = |m: &Model| QuantOptions {
            threads: 2,
            head,
            int4: bits4.then(int4),
            ..QuantOptions::new(Method::Haq, m)
        };
        let tied = quantize(tied_trained(), calib, opts(&probe));
        let old = quantize(untied(tied_trained()), calib, opts(&probe));
        assert!(tied.weights.lm_head.is_none() && tied.config.head_transform);
        assert!(old.weights.lm_head.is_some() && !old.config.head_transform);
        let form_ok = matches!(
            (&tied.weights.embed.weight, head),
            (LinearWeight::Int8WeightOnly(_), HeadQuant::WeightOnly)
                | (LinearWeight::Int8(_), HeadQuant::W8A8)
        );
        assert!(form_ok, "{head:?}: the table is not the head's int8 form");
        let ppl = |m: Arc<Model>| {
            let e = Engine::new(m, 2).unwrap();
            perplexity(&e, held, 256, |_, _| {}).unwrap().ppl
        };
        let (tied, old) = (Arc::new(tied), Arc::new(old));
        let (rel_tied, rel_old) = (
            relative_rms(&logits(tied.clone(), held), &want),
            relative_rms(&logits(old.clone(), held), &want),
        );
        let (p_tied, p_old) = (ppl(tied), ppl(old));
        eprintln!(
            "{head:?} int4 {bits4}: logits vs f32 tied {rel_tied:.2e}, untied {rel_old:.2e}; \
             ppl f32 {f32_ppl:.4}, tied {p_tied:.4} ({:+.3}%), untied {p_old:.4} ({:+.3}%)",
            (p_tied / f32_ppl - 1.0) * 100.0,
            (p_old / f32_ppl - 1.0) * 100.0
        );
        assert!(rel_tied < 1.25 * rel_old + 1e-3, "{rel_tied} vs {rel_old}");
        assert!((p_tied / p_old - 1.0).abs() < 0.002, "{p_tied} vs {p_old}");
    }
}

/// The logits' relative RMS error against the f32 model on the calibration text's first 768
/// tokens and on held-out text, for `model` quantized with haq on `calib`.
fn head_errors(model: Arc<Model>, calib: &[u32], held: &[u32]) -> [f64; 2] {
    [&calib[..768], held].map(|toks| {
        relative_rms(
            &logits(model.clone(), toks),
            &logits(Arc::new(trained()), toks),
        )
    })
}

fn trained() -> Model {
    Model::load(&fixture("trained-moe")).unwrap()
}

fn haq_with_head(m: Model, calib: &[u32], head_gptq: bool) -> Model {
    let opts = QuantOptions {
        threads: 2,
        head_gptq,
        ..QuantOptions::new(Method::Haq, &m)
    };
    quantize(m, calib, opts)
}

/// haq rounds the head by GPTQ on its input (`quant::head`: the last layer's calibration
/// outputs through the final norm) unless told to round it to nearest. On the trained fixture
/// (its own untied head) the layers come out the same either way, and GPTQ's head — which
/// minimises the head's output error on those inputs — gives logits closer to the f32 model's
/// on the calibration text and on held-out text (deterministic: the same inputs each run).
#[test]
fn gptq_rounds_the_head_closer_to_f32_than_rounding() {
    let probe = trained();
    let toks = tokens(&probe);
    let (held, calib) = (&toks[..768], &toks[768..768 + 2048]);
    let gptq = haq_with_head(trained(), calib, true);
    let rtn = haq_with_head(trained(), calib, false);
    let head = |m: &Model| match &m.weights.lm_head.as_ref().unwrap().weight {
        LinearWeight::Int8WeightOnly(t) => t.data.to_vec(),
        _ => panic!("the head is not int8 weight-only"),
    };
    assert_ne!(head(&gptq), head(&rtn));
    let (e_gptq, e_rtn) = (
        head_errors(Arc::new(gptq), calib, held),
        head_errors(Arc::new(rtn), calib, held),
    );
    eprintln!(
        "logits vs f32, calibration / held-out: head by GPTQ {:.3e} / {:.3e}, rounded {:.3e} / {:.3e}",
        e_gptq[0], e_gptq[1], e_rtn[0], e_rtn[1]
    );
    assert!(e_gptq[0] < e_rtn[0] && e_gptq[1] < e_rtn[1]);
}

/// A tied table is the head and the embeddings at once; GPTQ rounds it for the head. Here
/// (the trained fixture with its head replaced by its embeddings) the table GPTQ wrote, used
/// as the head beside the nearest-rounded table for the lookups, is closer to f32 than the
/// nearest-rounded table in both roles. As embeddings GPTQ's rows are worse on this model
/// (GPTQ moves rounding error into directions the head's input does not excite, and this
/// table was never trained as a head: ppl ~2660), so whether the one table gains is measured
/// on a real tied model, SmolLM2, by KL in docs/quantization.md.
#[test]
fn gptq_rounds_the_tied_table_for_the_head() {
    let probe = tied_trained();
    let toks = tokens(&probe);
    let (held, calib) = (&toks[..768], &toks[768..768 + 2048]);
    let gptq = haq_with_head(tied_trained(), calib, true);
    let rtn = haq_with_head(tied_trained(), calib, false);
    let table = |m: &Model| match &m.weights.embed.weight {
        LinearWeight::Int8WeightOnly(t) => t.data.to_vec(),
        _ => panic!("the tied table is not int8 weight-only"),
    };
    let (tg, tr) = (table(&gptq), table(&rtn));
    let changed = tg.iter().zip(&tr).filter(|(a, b)| a != b).count();
    assert!(
        changed > tg.len() / 100,
        "only {changed} table entries differ"
    );
    assert!(gptq.weights.lm_head.is_none() && gptq.config.head_transform);
    // GPTQ's table as the head, the rounded one for the lookups.
    let mut split = gptq;
    let mut head = std::mem::replace(&mut split.weights.embed, rtn.weights.embed.clone());
    head.name = "lm_head".into();
    split.weights.lm_head = Some(head);
    let rtn = Arc::new(rtn);
    let want = |toks: &[u32]| logits(Arc::new(tied_trained()), toks);
    let err = |m: &Arc<Model>, toks: &[u32]| relative_rms(&logits(m.clone(), toks), &want(toks));
    let split = Arc::new(split);
    for (what, toks) in [("calibration", &calib[..768]), ("held-out", held)] {
        let (e_split, e_rtn) = (err(&split, toks), err(&rtn, toks));
        eprintln!(
            "{what}: logits vs f32, GPTQ table as the head {e_split:.3e}, rounded {e_rtn:.3e}"
        );
        assert!(e_split < e_rtn, "{what}: {e_split} vs {e_rtn}");
    }
}
