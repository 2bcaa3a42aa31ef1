//! GGUF dequantization against the `gguf` Python package (0.19): every quantized tensor of
//! tests/fixtures/gguf-quants/quants.gguf (written by tools/make_gguf_quant_fixtures.py) must
//! decode to exactly the f32 bits the package gave, stored beside it as `NAME.expected`.

use edgemoe::model::gguf::GgufFile;
use edgemoe::model::weights::Stored;
use std::path::Path;

fn f32s(s: Stored) -> Vec<f32> {
    match s {
        Stored::F32(b) => b.to_vec(),
        _ => panic!("expected f32 values"),
    }
}

#[test]
fn every_quantized_type_decodes_bit_exactly_as_the_gguf_package_does() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf-quants/quants.gguf");
    let f = GgufFile::open(&path).unwrap();
    let mut types = vec![];
    for (name, info) in f.tensors() {
        if name.ends_with(".expected") {
            continue;
        }
        let want = f32s(f.read(&format!("{name}.expected")).unwrap());
        let got = f32s(f.read(name).unwrap());
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{name}[{i}]: {g} vs gguf's {w}");
        }
        types.push(info.ty.name());
    }
    types.sort();
    types.dedup();
    assert_eq!(
        types,
        ["MXFP4", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"],
        "the fixture covers every quantized type edgemoe reads"
    );
}

// ---------------------------------------------------------------------------------------------
// What a quantized GGUF becomes: qwen2moe-tiny with its matrices in Q8_0
// (tools/make_moe_gguf_fixtures.py; experts stacked, a shared expert, a dense layer).

use edgemoe::model::gguf::blocks::BlockMatrix;
use edgemoe::model::int8::Int8Matrix;
use edgemoe::model::weights::LinearWeight;
use edgemoe::quant::{self, Method, QuantOptions};
use edgemoe::Model;
use std::sync::Arc;

fn q8_0_moe() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qwen2moe-tiny/qwen2moe-tiny.q8_0.gguf")
}

/// The reference for a converted matrix: the quantizer's round to nearest of the decoded f32
/// rows, scales rounded to f16 as an .emoe stores them.
fn rtn(rows: &[f32], n: usize, k: usize) -> Int8Matrix {
    let mut m = Int8Matrix::quantize_rtn(rows, n, k).unwrap();
    for s in m.scales.make_mut() {
        *s = half::f16::from_f32(*s).to_f32();
    }
    m
}

/// A direct run holds no f32 copy: every matrix (experts, shared expert, dense MLP, attention,
/// embeddings, head) is weight-only int8 equal to RTN of its decoded rows; only the routers and
/// the shared-expert gate (f32 in an .emoe too) are decoded to f32, exactly.
#[test]
fn a_direct_run_converts_each_matrix_to_int8_at_load() {
    let direct = Model::load(&q8_0_moe()).unwrap();
    let decoded = Model::load_f32(&q8_0_moe()).unwrap();
    let (mut int8, mut f32s) = (0, 0);
    for (a, b) in direct
        .weights
        .linears()
        .iter()
        .zip(decoded.weights.linears())
    {
        assert_eq!(a.name, b.name);
        let rows = b.f32_rows().unwrap();
        match &a.weight {
            LinearWeight::Int8WeightOnly(m) => {
                assert_eq!(m, &rtn(&rows, a.out_features, a.in_features), "{}", a.name);
                int8 += 1;
            }
            // F32 in the file (widths not whole Q8_0 blocks): used in place, as ever.
            LinearWeight::F32Rows(w) if w.is_mapped() => assert_eq!(&w[..], &rows[..]),
            LinearWeight::F32Rows(w) => {
                assert!(a.name.ends_with("gate"), "{} was decoded to f32", a.name);
                assert_eq!(&w[..], &rows[..], "{}", a.name);
                f32s += 1;
            }
            _ => panic!("{}: neither int8 nor f32", a.name),
        }
    }
    let c = &direct.config;
    let moe_layers = c
        .layer_ffn
        .iter()
        .filter(|k| c.num_experts > 0 && **k == edgemoe::model::config::FfnKind::Moe)
        .count();
    assert_eq!(
        f32s,
        2 * moe_layers,
        "a router and a shared-expert gate per MoE layer"
    );
    assert!(int8 > 2 * c.num_experts * moe_layers);
}

/// `quantize` reads the blocks a layer at a time: loaded in place, every matrix but the
/// embedding table is still the file's Q8_0 blocks (nothing decoded), and quantizing from there
/// gives exactly what quantizing the fully decoded model gives.
#[test]
fn quantize_decodes_one_layer_at_a_time_and_matches_the_decoded_model() {
    let in_place = Model::load_in_place(&q8_0_moe()).unwrap();
    for lin in in_place.weights.linears().into_iter().skip(1) {
        let blocks = match &lin.weight {
            LinearWeight::Prepared(p) => p.as_any().downcast_ref::<BlockMatrix>().is_some(),
            LinearWeight::F32Rows(w) => w.is_mapped(), // F32 in the file
            _ => false,
        };
        assert!(blocks, "{} was decoded at load", lin.name);
    }
    let decoded = Model::load_f32(&q8_0_moe()).unwrap();
    let opts = |m: &Model| QuantOptions {
        threads: 2,
        rotate: false,
        ..QuantOptions::new(Method::Rtn, m)
    };
    let (o1, o2) = (opts(&in_place), opts(&decoded));
    let (a, _) = quant::quantize(in_place, &[], 16, &o1, |_, _, _| {}).unwrap();
    let (b, _) = quant::quantize(decoded, &[], 16, &o2, |_, _, _| {}).unwrap();
    for (x, y) in a.weights.linears().iter().zip(b.weights.linears()) {
        let same = match (&x.weight, &y.weight) {
            (
                LinearWeight::Int8(p) | LinearWeight::Int8WeightOnly(p),
                LinearWeight::Int8(q) | LinearWeight::Int8WeightOnly(q),
            ) => p == q,
            _ => x.f32_rows() == y.f32_rows(),
        };
        assert!(same, "{}", x.name);
    }
}

/// The issue-27 families as Q8_0 GGUFs (tools/gguf_families.py: `gguf`'s Q8_0, routers F32).
/// Decoded (`load_f32`), every matrix is the F32 GGUF's (the checkpoint's own values) within
/// Q8_0's rounding — half a step of its block's scale `max|x|/127`, plus the f16 scale's
/// rounding (127 · 2⁻¹¹ of a step), bounded by 0.6 steps — in Hugging Face row order:
/// Granite's permuted q/k rows put back, GPT-OSS's de-interleaved gate/up, DeepSeek's split
/// kv_b (F32 halves beside Q8_0 matrices). A direct run holds each quantized matrix as int8
/// rows equal to RTN of those decoded rows, and runs.
#[test]
fn family_q8_0_ggufs_decode_in_hugging_face_order() {
    use edgemoe::engine::{BatchItem, Engine, Logits};
    for name in [
        "granitemoe-tiny",
        "glm4moe-tiny",
        "deepseekv3-tiny",
        "gptoss-tiny",
    ] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        let q8 = dir.join(format!("{name}.q8_0.gguf"));
        let exact = Model::load_f32(&dir.join(format!("{name}.gguf"))).unwrap();
        let decoded = Model::load_f32(&q8).unwrap();
        let direct = Model::load(&q8).unwrap();
        let (a, b, c) = (
            decoded.weights.linears(),
            exact.weights.linears(),
            direct.weights.linears(),
        );
        assert_eq!((a.len(), a.len()), (b.len(), c.len()), "{name}");
        let mut int8 = 0;
        for ((a, b), c) in a.iter().zip(b).zip(c) {
            assert_eq!((&a.name, &a.name), (&b.name, &c.name));
            let (got, want) = (a.f32_rows().unwrap(), b.f32_rows().unwrap());
            if a.in_features % 32 != 0 {
                assert_eq!(got, want, "{name} {}: F32 in the file", a.name);
            }
            for (blk, (g, w)) in got.chunks(32).zip(want.chunks(32)).enumerate() {
                let step = w.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
                for (x, y) in g.iter().zip(w) {
                    assert!(
                        (x - y).abs() <= 0.6 * step,
                        "{name} {} block {blk}: {x} vs {y} (step {step})",
                        a.name
                    );
                }
            }
            match &c.weight {
                LinearWeight::Int8WeightOnly(m) => {
                    assert_eq!(m, &rtn(&got, a.out_features, a.in_features), "{}", a.name);
                    int8 += 1;
                }
                _ => assert_eq!(c.f32_rows().unwrap(), got, "{name} {}", a.name),
            }
        }
        assert!(
            int8 > direct.config.num_experts,
            "{name}: {int8} int8 matrices"
        );
        let engine = Engine::new(Arc::new(direct), 1).unwrap();
        let mut cache = engine.new_cache();
        let logits = engine
            .forward(&mut [BatchItem {
                tokens: &[1, 20, 300, 7],
                cache: &mut cache,
                logits: Logits::All,
            }])
            .unwrap();
        assert!(logits[0].iter().all(|x| x.is_finite()), "{name}");
    }
}

/// `quantize` from a family's Q8_0 GGUF, a layer at a time from the file's blocks, gives
/// exactly what quantizing its fully decoded model gives (Granite's permuted q/k rows, GLM's
/// and GPT-OSS's layouts and DeepSeek's split `kv_b` included).
#[test]
fn family_q8_0_ggufs_quantize_from_the_blocks() {
    for name in [
        "granitemoe-tiny",
        "glm4moe-tiny",
        "gptoss-tiny",
        "deepseekv3-tiny",
    ] {
        let q8 = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
            .join(format!("{name}.q8_0.gguf"));
        let in_place = Model::load_in_place(&q8).unwrap();
        let decoded = Model::load_f32(&q8).unwrap();
        let opts = |m: &Model| QuantOptions {
            threads: 2,
            rotate: false,
            ..QuantOptions::new(Method::Rtn, m)
        };
        let (o1, o2) = (opts(&in_place), opts(&decoded));
        let (a, _) = quant::quantize(in_place, &[], 16, &o1, |_, _, _| {}).unwrap();
        let (b, _) = quant::quantize(decoded, &[], 16, &o2, |_, _, _| {}).unwrap();
        let mut int8 = 0;
        for (x, y) in a.weights.linears().iter().zip(b.weights.linears()) {
            let same = match (&x.weight, &y.weight) {
                (
                    LinearWeight::Int8(p) | LinearWeight::Int8WeightOnly(p),
                    LinearWeight::Int8(q) | LinearWeight::Int8WeightOnly(q),
                ) => {
                    int8 += 1;
                    p == q
                }
                _ => x.f32_rows() == y.f32_rows(),
            };
            assert!(same, "{name} {}", x.name);
        }
        assert!(int8 > a.config.num_experts, "{name}: {int8} int8 matrices");
    }
}
