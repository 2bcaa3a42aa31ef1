//! W4A8 experts (`quantize --bits 4`): the .emoe round trip is exact, the file is version 4 and
//! its expert blocks half the W8A8 ones, paging computes what the mapped model does while
//! reading the smaller blocks, and the loss stays near the f32 model's.

use edgemoe::engine::{BatchItem, Engine, Logits};
use edgemoe::experts::blockio::ReadMode;
use edgemoe::experts::budget::MemBudget;
use edgemoe::experts::pager::Policy;
use edgemoe::experts::predict::PredictSource;
use edgemoe::experts::{ExpertService, PagingOptions};
use edgemoe::kv::KvDemand;
use edgemoe::model::weights::{Ffn, LinearWeight};
use edgemoe::quant::{self, gptq4::Int4Grid, store::write_emoe, Int4Options, Method, QuantOptions};
use edgemoe::Model;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trained-moe")
}

fn int4(group: usize, symmetric: bool, keep_int8: &[&str]) -> Option<Int4Options> {
    Some(Int4Options {
        grid: Int4Grid { group, symmetric },
        keep_int8: keep_int8.iter().map(|s| s.to_string()).collect(),
        also: Vec::new(),
    })
}

/// The fixture quantized with `method` (calibrated on the start of calib.txt) into `path`.
fn quantize_to(path: &Path, method: Method, int4: Option<Int4Options>) -> Model {
    let model = Model::load(&fixture()).unwrap();
    let text = std::fs::read_to_string(fixture().join("calib.txt")).unwrap();
    let calib = model.tokenizer.encode(&text, false).unwrap();
    let opts = QuantOptions {
        threads: 2,
        int4,
        ..QuantOptions::new(method, &model)
    };
    let (q, _) = quant::quantize(model, &calib[..2048], 256, &opts, |_, _, _| {}).unwrap();
    write_emoe(&q, serde_json::json!({"method": "test"}), path).unwrap();
    q
}

fn forward(engine: &Engine, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = engine.new_cache();
    let mut out = engine
        .forward(&mut [BatchItem {
            tokens: &tokens[..tokens.len() - 8],
            cache: &mut cache,
            logits: Logits::All,
        }])
        .unwrap();
    for &t in &tokens[tokens.len() - 8..] {
        let mut step = engine
            .forward(&mut [BatchItem {
                tokens: &[t],
                cache: &mut cache,
                logits: Logits::Last,
            }])
            .unwrap();
        out.append(&mut step);
    }
    out
}

/// Mean negative log-likelihood of `tokens[1..]` given the rows of a prefill.
fn nll(model: Arc<Model>, tokens: &[u32]) -> f64 {
    let engine = Engine::new(model, 2).unwrap();
    let mut cache = engine.new_cache();
    let rows = engine
        .forward(&mut [BatchItem {
            tokens,
            cache: &mut cache,
            logits: Logits::All,
        }])
        .unwrap()
        .remove(0);
    let vocab = rows.len() / tokens.len();
    let mut total = 0.0;
    for (i, &next) in tokens[1..].iter().enumerate() {
        let row = &rows[i * vocab..(i + 1) * vocab];
        let max = row.iter().fold(f32::MIN, |m, &v| m.max(v));
        let lse = row
            .iter()
            .map(|&v| f64::from(v - max).exp())
            .sum::<f64>()
            .ln()
            + f64::from(max);
        total += lse - f64::from(row[next as usize]);
    }
    total / (tokens.len() - 1) as f64
}

fn version(path: &Path) -> u32 {
    let bytes = std::fs::read(path).unwrap();
    u32::from_le_bytes(bytes[8..12].try_into().unwrap())
}

fn expert_kinds(model: &Model) -> (usize, usize) {
    let (mut four, mut eight) = (0, 0);
    for layer in &model.weights.layers {
        let Ffn::Moe(b) = &layer.ffn else { continue };
        for e in &b.experts {
            for lin in [&e.gate, &e.up, &e.down] {
                match lin.weight {
                    LinearWeight::Int4(_) => four += 1,
                    LinearWeight::Int8(_) => eight += 1,
                    _ => {}
                }
            }
        }
    }
    (four, eight)
}

#[test]
fn w4a8_round_trips_exactly_and_halves_the_expert_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let (p8, p4) = (tmp.path().join("w8.emoe"), tmp.path().join("w4.emoe"));
    quantize_to(&p8, Method::Haq, None);
    let q4 = quantize_to(&p4, Method::Haq, int4(64, true, &[]));
    assert_eq!(version(&p8), 3, "a file without int4 stays version 3");
    assert_eq!(version(&p4), 4);
    let loaded = Model::load(&p4).unwrap();
    assert_eq!(expert_kinds(&loaded), (4 * 8 * 3, 0));
    let text = std::fs::read_to_string(fixture().join("heldout.txt")).unwrap();
    let tokens = loaded.tokenizer.encode(&text[..3000], false).unwrap();
    let tokens = &tokens[..64];
    let a = forward(&Engine::new(Arc::new(q4), 2).unwrap(), tokens);
    let b = forward(&Engine::new(Arc::new(loaded), 2).unwrap(), tokens);
    assert!(a == b, "logits differ after the .emoe round trip");

    // The same bytes claiming version 3 are refused: U8 tensors need version 4.
    let mut v3 = std::fs::read(&p4).unwrap();
    v3[8..12].copy_from_slice(&3u32.to_le_bytes());
    let p3 = tmp.path().join("v3.emoe");
    std::fs::write(&p3, v3).unwrap();
    let err = Model::load(&p3)
        .err()
        .expect("a version 3 file with int4 opens")
        .to_string();
    assert!(err.contains("U8") && err.contains("version 3"), "{err}");

    let block_bytes = |p: &Path| -> u64 {
        let f = edgemoe::model::emoe::EmoeFile::open(p).unwrap();
        f.expert_blocks().iter().map(|b| b.len).sum()
    };
    let (b8, b4) = (block_bytes(&p8), block_bytes(&p4));
    assert!(b4 * 100 <= b8 * 55, "int4 blocks {b4} bytes vs int8 {b8}");
}

#[test]
fn keep_int8_keeps_the_named_experts_at_8_bits() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("mixed.emoe");
    quantize_to(&p, Method::Rtn, int4(32, false, &[".w2"]));
    let loaded = Model::load(&p).unwrap();
    assert_eq!(expert_kinds(&loaded), (4 * 8 * 2, 4 * 8));
}

#[test]
fn w4a8_loss_stays_near_f32_and_paging_computes_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let p4 = tmp.path().join("w4.emoe");
    quantize_to(&p4, Method::Haq, int4(64, true, &[]));
    let f32_model = Arc::new(Model::load(&fixture()).unwrap());
    let model = Arc::new(Model::load(&p4).unwrap());
    let text = std::fs::read_to_string(fixture().join("heldout.txt")).unwrap();
    let tokens = model.tokenizer.encode(&text[..6000], false).unwrap();
    let window = &tokens[..256];
    let (l32, l4) = (nll(f32_model, window), nll(model.clone(), window));
    // ppl ratio e^(l4 − l32): measured well under 1% on this fixture (docs/quantization.md).
    assert!((l4 - l32).abs() < 0.02, "nll f32 {l32} vs W4A8 {l4}");

    let want = forward(&Engine::new(model.clone(), 2).unwrap(), &tokens[..48]);
    let opts = |mem: u64| PagingOptions {
        mem: MemBudget::Bytes(mem),
        policy: Policy::Lru,
        read_mode: ReadMode::Pread,
        prefetch: false,
        io_threads: 1,
        predict: PredictSource::Both,
        predict_extra: 1,
        profile: None,
        kv: KvDemand::default(),
    };
    let probe = ExpertService::paged(model.clone(), &opts(1 << 40)).unwrap();
    let plan = *probe.plan().unwrap();
    drop(probe);
    let service = ExpertService::paged(
        model.clone(),
        &opts(plan.fixed.total() + 3 * plan.slot_bytes),
    )
    .unwrap();
    let engine = Engine::new(model.clone(), 2)
        .unwrap()
        .with_experts(service)
        .unwrap();
    let got = forward(&engine, &tokens[..48]);
    assert!(
        got == want,
        "paged W4A8 logits differ from the mapped model's"
    );
    let s = engine.experts.cache_stats(0).unwrap();
    let block = edgemoe::model::emoe::EmoeFile::open(&p4)
        .unwrap()
        .expert_blocks()[0]
        .len;
    // Every read is one whole int4 block: the pager counts (and pages) the int4 bytes.
    assert!(
        s.misses > 0 && s.bytes_read > 0 && s.bytes_read.is_multiple_of(block),
        "{s:?}, blocks of {block}"
    );
    assert!(
        plan.slot_bytes <= block.next_multiple_of(4096),
        "slots sized to int4 blocks of {block}: {plan:?}"
    );
}
