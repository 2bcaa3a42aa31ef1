//! The .emoe store: a written file reads back byte-exactly, and each class of corruption gives a
//! clear error naming it (never a panic), at open or — for an expert block's checksum — on first
//! access of that block.

use edgemoe::model::emoe::{
    parse_header, EmoeDtype, EmoeFile, EmoeWriter, TensorClass, TensorData, BLOCK_ALIGN,
    PREAMBLE_LEN,
};
use edgemoe::model::synthetic::default_config;
use edgemoe::model::weights::TensorSource;
use edgemoe::util::rng::SplitMix64;
use edgemoe::Error;
use serde_json::{json, Value};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::process::Command;

const TOKENIZER: &str = r#"{"version":"1.0","model":{"type":"BPE","vocab":{}}}"#;
/// The two expert blocks of the fixture, in write order.
const BLOCKS: [(usize, usize); 2] = [(0, 1), (1, 3)];

/// One tensor as written, for comparison.
struct Written {
    name: String,
    dtype: EmoeDtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
    block: Option<(usize, usize)>,
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    bytes: Vec<u8>,
    written: Vec<Written>,
}

fn random_bytes(rng: &mut SplitMix64, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

fn f32_bytes(rng: &mut SplitMix64, n: usize) -> Vec<u8> {
    (0..n).flat_map(|_| rng.normal().to_le_bytes()).collect()
}

fn tensor(name: &str, dtype: EmoeDtype, shape: &[usize], bytes: Vec<u8>) -> TensorData<'static> {
    TensorData {
        name: name.to_string(),
        dtype,
        shape: shape.to_vec(),
        bytes: Cow::Owned(bytes),
    }
}

/// A small Mixtral-named file: five non-expert tensors (one F16) and two expert blocks of
/// int8 weights with f32 scales and smoothing factors.
fn fixture() -> Fixture {
    let mut rng = SplitMix64::new(0xe0e);
    let f16: Vec<u8> = [1.5f32, -2.0, 0.25, 3.0]
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    let plain = vec![
        tensor(
            "model.embed_tokens.weight",
            EmoeDtype::F32,
            &[16, 8],
            f32_bytes(&mut rng, 128),
        ),
        tensor(
            "model.layers.0.self_attn.q_proj.weight",
            EmoeDtype::F32,
            &[8, 8],
            f32_bytes(&mut rng, 64),
        ),
        tensor(
            "model.layers.0.input_layernorm.weight",
            EmoeDtype::F32,
            &[8],
            f32_bytes(&mut rng, 8),
        ),
        tensor(
            "model.layers.0.block_sparse_moe.gate.weight",
            EmoeDtype::F16,
            &[4],
            f16,
        ),
        tensor(
            "lm_head.weight",
            EmoeDtype::F32,
            &[16, 8],
            f32_bytes(&mut rng, 128),
        ),
    ];
    let mut written: Vec<Written> = plain
        .iter()
        .map(|t| Written {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            bytes: t.bytes.to_vec(),
            block: None,
        })
        .collect();
    let quant = json!({"method": "smoothquant-w8a8", "alpha": 0.5, "granularity": "per-channel"});
    let mut w = EmoeWriter::new(&default_config(), TOKENIZER.to_string(), quant);
    for t in plain {
        w.add_tensor(t);
    }
    for (layer, expert) in BLOCKS {
        let p = format!("model.layers.{layer}.block_sparse_moe.experts.{expert}");
        let ts = vec![
            tensor(
                &format!("{p}.w1.weight"),
                EmoeDtype::I8,
                &[16, 8],
                random_bytes(&mut rng, 128),
            ),
            tensor(
                &format!("{p}.w1.scale"),
                EmoeDtype::F32,
                &[16],
                f32_bytes(&mut rng, 16),
            ),
            tensor(
                &format!("{p}.w1.smooth"),
                EmoeDtype::F32,
                &[8],
                f32_bytes(&mut rng, 8),
            ),
            tensor(
                &format!("{p}.w2.weight"),
                EmoeDtype::I8,
                &[8, 15],
                random_bytes(&mut rng, 120),
            ),
            tensor(
                &format!("{p}.w2.scale"),
                EmoeDtype::F32,
                &[8],
                f32_bytes(&mut rng, 8),
            ),
        ];
        for t in &ts {
            written.push(Written {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                bytes: t.bytes.to_vec(),
                block: Some((layer, expert)),
            });
        }
        w.add_expert_block(layer, expert, ts);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.emoe");
    let summary = w.write(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(summary.total_bytes, bytes.len() as u64);
    assert_eq!(summary.expert_blocks, 2);
    assert_eq!(summary.tensors, written.len());
    Fixture {
        _dir: dir,
        path,
        bytes,
        written,
    }
}

/// The header JSON of an .emoe file's bytes.
fn header_of(bytes: &[u8]) -> Value {
    let len = u64::from_le_bytes(bytes[12..20].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[PREAMBLE_LEN..PREAMBLE_LEN + len]).unwrap()
}

/// Rewrites the header JSON in place (it must still fit before the data region).
fn with_header(bytes: &[u8], edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut h = header_of(bytes);
    let data_start = h["data"]["offset"].as_u64().unwrap() as usize;
    edit(&mut h);
    let json = serde_json::to_vec(&h).unwrap();
    assert!(
        PREAMBLE_LEN + json.len() <= data_start,
        "edited header too long"
    );
    let mut out = bytes.to_vec();
    out[PREAMBLE_LEN..data_start].fill(0);
    out[12..20].copy_from_slice(&(json.len() as u64).to_le_bytes());
    out[PREAMBLE_LEN..PREAMBLE_LEN + json.len()].copy_from_slice(&json);
    reseal(&mut out);
    out
}

/// Stores the CRC-32C of the header JSON as it now is (after an edit), where it fits.
fn reseal(b: &mut [u8]) {
    let Some(len) = b
        .get(12..20)
        .map(|l| u64::from_le_bytes(l.try_into().unwrap()))
    else {
        return;
    };
    let Some(json) = usize::try_from(len)
        .ok()
        .and_then(|len| b.get(PREAMBLE_LEN..PREAMBLE_LEN.checked_add(len)?))
    else {
        return;
    };
    let crc = crc32c::crc32c(json);
    b[20..24].copy_from_slice(&crc.to_le_bytes());
}

fn tensor_json<'a>(h: &'a mut Value, name: &str) -> &'a mut Value {
    h["tensors"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|t| t["name"] == name)
        .unwrap()
}

fn open_bytes(bytes: &[u8]) -> (tempfile::TempDir, PathBuf, edgemoe::Result<EmoeFile>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.emoe");
    std::fs::write(&path, bytes).unwrap();
    let r = EmoeFile::open(&path);
    (dir, path, r)
}

/// Opening must fail with an `Error::Emoe` whose message mentions each of `want`.
fn expect_open_error(bytes: &[u8], want: &[&str]) {
    let (_dir, path, r) = open_bytes(bytes);
    let err = match r {
        Ok(_) => panic!("opened a corrupt file; expected an error mentioning {want:?}"),
        Err(e) => e,
    };
    assert!(matches!(err, Error::Emoe { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    for w in want {
        assert!(msg.contains(w), "{msg:?} should mention {w:?}");
    }
    // The pure parser agrees (except for the data-region checksum, which open checks).
    if !msg.contains("checksum") {
        assert!(parse_header(bytes).is_err());
    }
}

#[test]
fn round_trips_every_tensor_byte_exactly() {
    let fx = fixture();
    let f = EmoeFile::open(&fx.path).unwrap();
    assert_eq!(f.config(), &default_config());
    assert_eq!(f.tokenizer_json(), TOKENIZER);
    assert_eq!(f.quant()["method"], "smoothquant-w8a8");
    for w in &fx.written {
        let v = f.tensor(&w.name).unwrap();
        assert_eq!(v.dtype, w.dtype, "{}", w.name);
        assert_eq!(v.shape, &w.shape[..], "{}", w.name);
        assert_eq!(v.bytes, &w.bytes[..], "{}", w.name);
        assert_eq!(
            v.bytes.as_ptr() as usize % 64,
            0,
            "{} is not 64-byte aligned",
            w.name
        );
        assert!(f.has(&w.name));
    }
    assert!(!f.has("nope"));

    // Blocks: 4096-aligned, in write order, each holding its expert's tensors.
    let blocks = f.expert_blocks();
    assert_eq!(blocks.len(), 2);
    for (b, (layer, expert)) in blocks.iter().zip(BLOCKS) {
        assert_eq!((b.layer, b.expert), (layer, expert));
        assert_eq!(b.offset % BLOCK_ALIGN, 0);
        let mine: Vec<&Written> = fx
            .written
            .iter()
            .filter(|w| w.block == Some((layer, expert)))
            .collect();
        assert_eq!(
            b.tensors,
            mine.iter().map(|w| w.name.clone()).collect::<Vec<_>>()
        );
        let block = f.block_bytes(layer, expert).unwrap();
        assert_eq!(block.len() as u64, b.len);
        let entry = f.header().get(&mine[0].name).unwrap();
        assert_eq!(entry.offset, b.offset, "first tensor starts the block");
        assert_eq!(&block[..mine[0].bytes.len()], &mine[0].bytes[..]);
    }
    assert!(f.block_bytes(3, 7).is_err());
    f.verify_all().unwrap();
}

#[test]
fn views_and_tensor_source() {
    let fx = fixture();
    let f = EmoeFile::open(&fx.path).unwrap();
    let q = &fx.written[1];
    let want: Vec<f32> = q
        .bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(
        TensorSource::tensor(&f, &q.name, &[8, 8], "test").unwrap(),
        want
    );
    assert_eq!(f.tensor(&q.name).unwrap().as_f32().unwrap(), &want[..]);
    // F16 converts.
    let gate = "model.layers.0.block_sparse_moe.gate.weight";
    assert_eq!(
        TensorSource::tensor(&f, gate, &[4], "test").unwrap(),
        vec![1.5, -2.0, 0.25, 3.0]
    );
    // I8 views without copying, but is not an f32 tensor.
    let w1 = "model.layers.1.block_sparse_moe.experts.3.w1.weight";
    let i8s = f.tensor(w1).unwrap().as_i8().unwrap();
    assert_eq!(i8s.len(), 128);
    assert!(matches!(
        TensorSource::tensor(&f, w1, &[16, 8], "test"),
        Err(Error::UnsupportedDtype { .. })
    ));
    assert!(matches!(
        TensorSource::tensor(&f, &q.name, &[8, 9], "hidden_size"),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        TensorSource::tensor(&f, "missing", &[1], "x"),
        Err(Error::MissingTensor { .. })
    ));
    assert!(TensorSource::has(&f, &q.name));

    // Bytes per class: the experts' int8 params and everything in the blocks.
    let tally = f.header().class_tally();
    let experts = &tally.0[&TensorClass::Experts];
    assert_eq!(experts.int8_params, 2 * (128 + 120));
    assert_eq!(experts.tensors, 10);
    assert_eq!(tally.0[&TensorClass::Router].tensors, 1);
    assert_eq!(tally.0[&TensorClass::Head].bytes, 512);
}

#[test]
fn writer_is_atomic_and_rejects_bad_input() {
    let fx = fixture();
    let tmp = PathBuf::from(format!("{}.tmp", fx.path.display()));
    assert!(!tmp.exists(), "temporary file left behind");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.emoe");
    let cfg = default_config();
    let write = |setup: &dyn Fn(&mut EmoeWriter)| {
        let mut w = EmoeWriter::new(&cfg, String::new(), Value::Null);
        setup(&mut w);
        w.write(&path).map(|_| ()).unwrap_err().to_string()
    };
    let t = |name: &str, n: usize| tensor(name, EmoeDtype::F32, &[n], vec![0; 4 * n]);
    let err = write(&|w| {
        w.add_tensor(t("a", 2));
        w.add_expert_block(0, 0, vec![t("a", 1)]);
    });
    assert!(err.contains("duplicate tensor name `a`"), "{err}");
    let err = write(&|w| w.add_tensor(tensor("a", EmoeDtype::F32, &[3], vec![0; 8])));
    assert!(err.contains("has 8 bytes"), "{err}");
    let err = write(&|w| {
        w.add_expert_block(0, 0, vec![t("a", 1)]);
        w.add_expert_block(0, 0, vec![t("b", 1)]);
    });
    assert!(
        err.contains("duplicate expert block (layer 0, expert 0)"),
        "{err}"
    );
    let err = write(&|w| w.add_expert_block(0, 99, vec![t("a", 1)]));
    assert!(err.contains("out of range"), "{err}");
    assert!(!path.exists() && !dir.path().join("x.emoe.tmp").exists());

    // A file with no expert blocks and no tensors is still valid.
    let w = EmoeWriter::new(&cfg, String::new(), Value::Null);
    w.write(&path).unwrap();
    let f = EmoeFile::open(&path).unwrap();
    assert!(f.expert_blocks().is_empty());
}

#[test]
fn rejects_bad_magic() {
    let fx = fixture();
    let mut b = fx.bytes.clone();
    b[..8].copy_from_slice(b"GGUF\x03\0\0\0");
    expect_open_error(&b, &["not an .emoe file"]);
    // A safetensors file (8-byte length, then JSON) is not one either.
    let mut st = 2u64.to_le_bytes().to_vec();
    st.extend_from_slice(b"{}");
    expect_open_error(&st, &["not an .emoe file"]);
}

#[test]
fn rejects_unsupported_version() {
    let fx = fixture();
    let mut b = fx.bytes.clone();
    b[8..12].copy_from_slice(&5u32.to_le_bytes());
    expect_open_error(&b, &["unsupported .emoe version 5", "versions 3 and 4"]);
    b[8..12].copy_from_slice(&1u32.to_le_bytes());
    expect_open_error(&b, &["version 1 .emoe", "re-quantize"]);
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    expect_open_error(&b, &["version 2 .emoe", "no checksum", "re-quantize"]);
}

#[test]
fn rejects_header_length_past_end_or_over_cap() {
    let fx = fixture();
    let mut b = fx.bytes.clone();
    b[12..20].copy_from_slice(&(fx.bytes.len() as u64).to_le_bytes());
    expect_open_error(&b, &["header length", "past the end", "truncated"]);
    b[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_open_error(&b, &["header length", "exceeds"]);
}

#[test]
fn rejects_header_that_is_not_json_or_misses_fields() {
    let fx = fixture();
    let mut b = fx.bytes.clone();
    b[PREAMBLE_LEN] = b'#';
    // Caught by the header checksum first; resealed, by the JSON parser.
    expect_open_error(&b, &["header checksum mismatch", "corrupt"]);
    reseal(&mut b);
    expect_open_error(&b, &["not valid JSON"]);
    let b = with_header(&fx.bytes, |h| {
        h.as_object_mut().unwrap().remove("blocks");
    });
    expect_open_error(&b, &["malformed", "missing field `blocks`"]);
    let b = with_header(&fx.bytes, |h| h["tensors"][0]["offset"] = json!("zero"));
    expect_open_error(&b, &["malformed"]);
    let b = with_header(&fx.bytes, |h| h["tensors"][0]["dtype"] = json!("Q4_K"));
    expect_open_error(&b, &["malformed", "Q4_K"]);
}

#[test]
fn rejects_tensor_outside_the_file() {
    let fx = fixture();
    let end = fx.bytes.len() as u64;
    let b = with_header(&fx.bytes, |h| {
        tensor_json(h, "lm_head.weight")["offset"] = json!(end)
    });
    expect_open_error(
        &b,
        &["tensor `lm_head.weight`", "past the end", "truncated"],
    );
    let b = with_header(&fx.bytes, |h| {
        tensor_json(h, "lm_head.weight")["offset"] = json!(u64::MAX - 64)
    });
    expect_open_error(&b, &["tensor `lm_head.weight`", "overflows"]);
}

#[test]
fn rejects_len_that_does_not_match_shape() {
    let fx = fixture();
    let b = with_header(&fx.bytes, |h| {
        tensor_json(h, "lm_head.weight")["shape"] = json!([16, 9])
    });
    expect_open_error(&b, &["tensor `lm_head.weight`", "does not match"]);
    let b = with_header(&fx.bytes, |h| {
        tensor_json(h, "lm_head.weight")["shape"] = json!([usize::MAX, usize::MAX])
    });
    expect_open_error(&b, &["tensor `lm_head.weight`", "overflows"]);
}

#[test]
fn rejects_tensor_not_inside_its_block() {
    let fx = fixture();
    let w1 = "model.layers.0.block_sparse_moe.experts.1.w1.weight";
    let b = with_header(&fx.bytes, |h| tensor_json(h, w1)["block"] = json!(1));
    expect_open_error(
        &b,
        &[
            w1,
            "not inside its declared expert block (layer 1, expert 3)",
        ],
    );
    let b = with_header(&fx.bytes, |h| tensor_json(h, w1)["block"] = Value::Null);
    expect_open_error(&b, &[w1, "not inside the non-expert data region"]);
    let b = with_header(&fx.bytes, |h| tensor_json(h, w1)["block"] = json!(7));
    expect_open_error(&b, &[w1, "names expert block 7"]);
}

#[test]
fn rejects_unaligned_blocks() {
    let fx = fixture();
    let b = with_header(&fx.bytes, |h| {
        let off = h["blocks"][1]["offset"].as_u64().unwrap();
        h["blocks"][1]["offset"] = json!(off + 64);
    });
    expect_open_error(
        &b,
        &["expert block (layer 1, expert 3)", "not 4096-byte aligned"],
    );
    let b = with_header(&fx.bytes, |h| h["data"]["offset"] = json!(4096 + 64));
    expect_open_error(&b, &["non-expert data region", "not 4096-byte aligned"]);
    let b = with_header(&fx.bytes, |h| {
        let off = tensor_json(h, "lm_head.weight")["offset"].as_u64().unwrap();
        tensor_json(h, "lm_head.weight")["offset"] = json!(off + 4);
    });
    expect_open_error(&b, &["tensor `lm_head.weight`", "not 64-byte aligned"]);
}

#[test]
fn rejects_overlapping_tensors_and_blocks() {
    let fx = fixture();
    let b = with_header(&fx.bytes, |h| {
        let off = tensor_json(h, "model.embed_tokens.weight")["offset"].clone();
        tensor_json(h, "model.layers.0.input_layernorm.weight")["offset"] = off;
    });
    expect_open_error(
        &b,
        &[
            "model.embed_tokens.weight",
            "model.layers.0.input_layernorm.weight",
            "overlap",
        ],
    );
    let b = with_header(&fx.bytes, |h| {
        h["blocks"][1]["offset"] = h["blocks"][0]["offset"].clone()
    });
    expect_open_error(
        &b,
        &[
            "expert block (layer 0, expert 1)",
            "expert block (layer 1, expert 3)",
            "overlap",
        ],
    );
    let b = with_header(&fx.bytes, |h| {
        h["blocks"][0]["offset"] = h["data"]["offset"].clone()
    });
    expect_open_error(&b, &["non-expert data region", "overlap"]);
    let b = with_header(&fx.bytes, |h| h["data"]["offset"] = json!(0));
    expect_open_error(&b, &["overlaps the header"]);
}

#[test]
fn rejects_duplicate_tensor_names() {
    let fx = fixture();
    let b = with_header(&fx.bytes, |h| {
        h["tensors"][1]["name"] = json!("model.embed_tokens.weight")
    });
    expect_open_error(&b, &["duplicate tensor name `model.embed_tokens.weight`"]);
}

#[test]
fn rejects_duplicate_and_out_of_range_expert_blocks() {
    let fx = fixture();
    let b = with_header(&fx.bytes, |h| {
        h["blocks"][1]["layer"] = json!(0);
        h["blocks"][1]["expert"] = json!(1);
    });
    expect_open_error(&b, &["duplicate expert block (layer 0, expert 1)"]);
    let b = with_header(&fx.bytes, |h| h["blocks"][1]["layer"] = json!(99));
    expect_open_error(&b, &["expert block (layer 99, expert 3)", "out of range"]);
}

#[test]
fn block_checksum_is_verified_on_first_access() {
    let fx = fixture();
    let h = header_of(&fx.bytes);
    let off = h["blocks"][1]["offset"].as_u64().unwrap() as usize;
    let mut b = fx.bytes.clone();
    b[off + 3] ^= 0x40;
    let (_dir, path, r) = open_bytes(&b);
    let f = r.expect("a bad block checksum is only found on first access");
    // The other block is fine.
    f.tensor("model.layers.0.block_sparse_moe.experts.1.w1.weight")
        .unwrap();
    f.block_bytes(0, 1).unwrap();
    let w1 = "model.layers.1.block_sparse_moe.experts.3.w1.scale";
    for _ in 0..2 {
        // Twice: the cached verdict still fails.
        let msg = f.tensor(w1).map(|_| ()).unwrap_err().to_string();
        for want in [
            "expert block (layer 1, expert 3)",
            "checksum mismatch",
            &path.display().to_string(),
        ] {
            assert!(msg.contains(want), "{msg:?} should mention {want:?}");
        }
    }
    assert!(f.block_bytes(1, 3).is_err());
    assert!(f.verify_all().is_err());
    // Loaders take tensors unread; the block is checked when its expert first runs.
    let bad = TensorSource::expert_block(&f, 1, 3).unwrap();
    let msg = bad.verify_checksum().unwrap_err().to_string();
    assert!(msg.contains("expert block (layer 1, expert 3)"), "{msg}");
    TensorSource::expert_block(&f, 0, 1)
        .unwrap()
        .verify_checksum()
        .unwrap();
    // Non-expert tensors are unaffected.
    f.tensor("lm_head.weight").unwrap();
}

#[test]
fn data_region_checksum_is_verified_at_open() {
    let fx = fixture();
    let off = header_of(&fx.bytes)["data"]["offset"].as_u64().unwrap() as usize;
    let mut b = fx.bytes.clone();
    b[off + 5] ^= 1;
    expect_open_error(&b, &["non-expert data region", "checksum mismatch"]);
}

#[test]
fn rejects_truncated_files() {
    let fx = fixture();
    let h = header_of(&fx.bytes);
    let data = h["data"]["offset"].as_u64().unwrap() as usize;
    let block0 = h["blocks"][0]["offset"].as_u64().unwrap() as usize;
    let n = fx.bytes.len();
    for cut in [
        0,
        5,
        15,
        PREAMBLE_LEN,
        100,
        data,
        data + 10,
        block0 - 1,
        block0 + 5,
        n - 1,
    ] {
        expect_open_error(&fx.bytes[..cut], &["truncated"]);
    }
}

fn edgemoe(args: &[&str], file: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_edgemoe"))
        .arg("inspect")
        .arg(file)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn inspect_prints_tables_and_json() {
    let fx = fixture();
    let out = edgemoe(&[], &fx.path);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "version 3",
        "MixtralForCausalLM",
        "smoothquant-w8a8",
        "bytes per tensor class",
        "experts",
        "expert blocks (2)",
    ] {
        assert!(text.contains(want), "{text}\nshould mention {want:?}");
    }
    let out = edgemoe(&["--json", "--verify"], &fx.path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["version"], 3);
    assert_eq!(v["file_bytes"], fx.bytes.len() as u64);
    assert_eq!(v["quant"]["method"], "smoothquant-w8a8");
    assert_eq!(v["checksums_verified"], true);
    let blocks = v["expert_blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[1]["layer"], 1);
    assert_eq!(blocks[1]["expert"], 3);
    assert_eq!(blocks[1]["tensors"].as_array().unwrap().len(), 5);
    let experts = v["classes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["class"] == "experts")
        .unwrap();
    assert_eq!(experts["int8_params"], 2 * (128 + 120));
    assert!(experts["bytes_per_int8_param"].as_f64().unwrap() > 1.0);
}

/// A failing `inspect` exits non-zero with one `error:` line and no panic.
fn expect_inspect_failure(args: &[&str], file: &Path, want: &str) {
    let out = edgemoe(args, file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {stderr}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(want),
        "{stderr}"
    );
}

#[test]
fn inspect_fails_cleanly_on_corrupt_files() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.emoe");
    std::fs::write(&bad, &fx.bytes[..fx.bytes.len() / 2]).unwrap();
    expect_inspect_failure(&[], &bad, "truncated");
    expect_inspect_failure(&["--json"], &bad, "truncated");
    expect_inspect_failure(&[], &dir.path().join("missing.emoe"), "missing.emoe");

    // A bad block checksum passes a plain inspect but fails --verify.
    let off = header_of(&fx.bytes)["blocks"][0]["offset"]
        .as_u64()
        .unwrap() as usize;
    let mut b = fx.bytes.clone();
    b[off] ^= 0xff;
    std::fs::write(&bad, &b).unwrap();
    assert!(edgemoe(&[], &bad).status.success());
    expect_inspect_failure(&["--verify"], &bad, "expert block (layer 0, expert 1)");
}

/// Replaces the header JSON (any bytes) and fixes the length field.
fn splice_header(file: &[u8], json: &[u8]) -> Vec<u8> {
    let len = u64::from_le_bytes(file[12..20].try_into().unwrap()) as usize;
    let mut out = file[..12].to_vec();
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&file[20..PREAMBLE_LEN]);
    out.extend_from_slice(json);
    out.extend_from_slice(&file[PREAMBLE_LEN + len..]);
    reseal(&mut out);
    out
}

/// One random corruption of a valid file, aimed mostly at the header.
fn mutate(good: &[u8], json: &[u8], rng: &mut SplitMix64) -> Vec<u8> {
    const INTERESTING: [u64; 12] = [
        0,
        1,
        7,
        63,
        64,
        4095,
        4096,
        8192,
        1 << 32,
        1 << 63,
        u64::MAX,
        u64::MAX - 63,
    ];
    let pick = |rng: &mut SplitMix64, n: usize| (rng.next_u64() % n.max(1) as u64) as usize;
    match rng.next_u64() % 6 {
        // Flip bytes in the preamble and header.
        0 => {
            let mut b = good.to_vec();
            for _ in 0..1 + pick(rng, 8) {
                let i = pick(rng, PREAMBLE_LEN + json.len());
                b[i] ^= 1 << pick(rng, 8);
            }
            b
        }
        // Truncate anywhere.
        1 => good[..pick(rng, good.len() + 1)].to_vec(),
        // Random bytes, half of them behind a valid magic and version.
        2 => {
            let mut b = if rng.next_u64().is_multiple_of(2) {
                good[..12].to_vec()
            } else {
                Vec::new()
            };
            let n = pick(rng, 300);
            b.extend((0..n).map(|_| rng.next_u64() as u8));
            b
        }
        // Replace one number in the JSON with an interesting or random one.
        3 => {
            let text = String::from_utf8_lossy(json);
            let starts: Vec<usize> = text
                .char_indices()
                .filter(|&(i, c)| {
                    c.is_ascii_digit() && (i == 0 || !text.as_bytes()[i - 1].is_ascii_digit())
                })
                .map(|(i, _)| i)
                .collect();
            let s = starts[pick(rng, starts.len())];
            let e = s + text[s..].bytes().take_while(u8::is_ascii_digit).count();
            let v = if rng.next_u64().is_multiple_of(2) {
                INTERESTING[pick(rng, INTERESTING.len())].to_string()
            } else {
                (rng.next_u64() % (2 * good.len() as u64)).to_string()
            };
            let new = format!("{}{}{}", &text[..s], v, &text[e..]);
            splice_header(good, new.as_bytes())
        }
        // Delete or duplicate a slice of the JSON.
        4 => {
            let a = pick(rng, json.len());
            let b = (a + pick(rng, 40)).min(json.len());
            let mut new = json[..a].to_vec();
            if rng.next_u64().is_multiple_of(2) {
                new.extend_from_slice(&json[a..b]);
                new.extend_from_slice(&json[a..b]);
            }
            new.extend_from_slice(&json[b..]);
            splice_header(good, &new)
        }
        // An arbitrary header length.
        _ => {
            let mut b = good.to_vec();
            let v = if rng.next_u64().is_multiple_of(2) {
                INTERESTING[pick(rng, INTERESTING.len())]
            } else {
                rng.next_u64() % (2 * good.len() as u64)
            };
            b[12..20].copy_from_slice(&v.to_le_bytes());
            b
        }
    }
}

/// The deterministic stand-in for `cargo fuzz run emoe_header`: 20k corrupt variants, no panic.
#[test]
fn parse_header_survives_20k_mutations() {
    let fx = fixture();
    let len = u64::from_le_bytes(fx.bytes[12..20].try_into().unwrap()) as usize;
    let json = fx.bytes[PREAMBLE_LEN..PREAMBLE_LEN + len].to_vec();
    assert!(parse_header(&fx.bytes).is_ok());
    let mut rng = SplitMix64::new(0xf022);
    let mut accepted = 0;
    for _ in 0..20_000 {
        let mut b = mutate(&fx.bytes, &json, &mut rng);
        if rng.next_u64().is_multiple_of(4) && !b.is_empty() {
            // Stack flips anywhere, tensor data included, on some.
            for _ in 0..1 + rng.next_u64() % 8 {
                let i = (rng.next_u64() % b.len() as u64) as usize;
                b[i] ^= 1 << (rng.next_u64() % 8);
            }
        }
        if rng.next_u64().is_multiple_of(2) {
            // Past the header checksum, to the JSON and layout checks behind it.
            reseal(&mut b);
        }
        if parse_header(&b).is_ok() {
            accepted += 1;
        }
    }
    // Some mutations are harmless (a checksum digit); most are not.
    assert!(
        accepted < 20_000 / 2,
        "{accepted} of 20000 corrupt variants accepted"
    );
}

/// Seeds the fuzz corpus with a valid file, so `cargo fuzz run emoe_header` starts past the
/// preamble: `cargo test --test emoe_format -- --ignored write_fuzz_seed`.
#[test]
#[ignore = "writes fuzz/corpus/emoe_header/fixture.emoe; run by hand before fuzzing"]
fn write_fuzz_seed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/emoe_header");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("fixture.emoe"), fixture().bytes).unwrap();
}
