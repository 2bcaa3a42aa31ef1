//! A crafted .emoe is refused when the model is opened, with one clear error per case: a header
//! whose bytes do not match its checksum, an embedded config that config.json validation would
//! refuse, and a config that disagrees with the tensor table (a tensor missing, extra, of the
//! wrong shape or dtype, or in another expert's block). Each file is a real quantized store
//! (the trained fixture, RTN) with its header edited and re-checksummed.

use edgemoe::model::emoe::{EmoeFile, PREAMBLE_LEN};
use edgemoe::quant::{self, store::write_emoe, Method, QuantOptions};
use edgemoe::{Error, Model};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::OnceLock;

const PAGE: u64 = 4096;

/// The trained fixture quantized with RTN, as bytes (built once per test binary).
fn store() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trained-moe");
        let model = Model::load(&dir).unwrap();
        let opts = QuantOptions {
            threads: 1,
            ..QuantOptions::new(Method::Rtn, &model)
        };
        let (q, _) = quant::quantize(model, &[], 0, &opts, |_, _, _| {}).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("m.emoe");
        write_emoe(&q, json!({"method": "rtn"}), &path).unwrap();
        std::fs::read(&path).unwrap()
    })
}

/// The tied Llama fixture quantized with RTN and rotated: no `lm_head`, the head reading the
/// final norm through `model.norm.transform`.
fn tied_store() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-tiny");
        let model = Model::load(&dir).unwrap();
        let opts = QuantOptions {
            threads: 1,
            ..QuantOptions::new(Method::Rtn, &model)
        };
        let (q, _) = quant::quantize(model, &[], 0, &opts, |_, _, _| {}).unwrap();
        assert!(q.config.head_transform);
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("m.emoe");
        write_emoe(&q, json!({"method": "rtn"}), &path).unwrap();
        std::fs::read(&path).unwrap()
    })
}

fn header_len(b: &[u8]) -> usize {
    u64::from_le_bytes(b[12..20].try_into().unwrap()) as usize
}

fn header(b: &[u8]) -> Value {
    serde_json::from_slice(&b[PREAMBLE_LEN..PREAMBLE_LEN + header_len(b)]).unwrap()
}

/// The file with its header edited by `edit`, re-checksummed; where the new header no longer
/// fits before the data, everything after it moves by whole pages (offsets are absolute, the
/// regions' checksums do not depend on where they lie).
fn craft(b: &[u8], edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut h = header(b);
    let data = h["data"]["offset"].as_u64().unwrap();
    edit(&mut h);
    let fits = |h: &Value, start: u64| {
        serde_json::to_vec(h).unwrap().len() + PREAMBLE_LEN <= start as usize
    };
    let mut shift = 0;
    while !fits(&h, data + shift) {
        shift += PAGE;
    }
    if shift > 0 {
        let bump = |v: &mut Value| *v = json!(v.as_u64().unwrap() + shift);
        bump(&mut h["data"]["offset"]);
        for t in h["tensors"].as_array_mut().unwrap() {
            bump(&mut t["offset"]);
        }
        for blk in h["blocks"].as_array_mut().unwrap() {
            bump(&mut blk["offset"]);
        }
    }
    let json = serde_json::to_vec(&h).unwrap();
    let mut out = b[..12].to_vec();
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&json).to_le_bytes());
    out.extend_from_slice(&json);
    out.resize((data + shift) as usize, 0);
    out.extend_from_slice(&b[data as usize..]);
    out
}

fn tensor<'a>(h: &'a mut Value, name: &str) -> &'a mut Value {
    h["tensors"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
}

/// Opening the bytes as a model fails with one `Error::Emoe` line naming the file and each of
/// `want`.
fn refused(bytes: &[u8], want: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crafted.emoe");
    std::fs::write(&path, bytes).unwrap();
    let err = match Model::load(&path) {
        Ok(_) => panic!("a crafted file opened; expected an error mentioning {want:?}"),
        Err(e) => e,
    };
    assert!(matches!(err, Error::Emoe { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    for w in want {
        assert!(msg.contains(w), "{msg:?} should mention {w:?}");
    }
}

fn opens(bytes: &[u8]) -> Model {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ok.emoe");
    std::fs::write(&path, bytes).unwrap();
    Model::load(&path).unwrap()
}

#[test]
fn the_untouched_store_and_harmless_edits_open() {
    assert_eq!(opens(store()).config.num_layers, 4);
    opens(&craft(store(), |_| {}));
    // An edit that moves the data by whole pages still gives a valid file.
    let big = craft(store(), |h| {
        h["quant"]["note"] = json!("x".repeat(3 * PAGE as usize))
    });
    assert!(header(&big)["data"]["offset"].as_u64() > header(store())["data"]["offset"].as_u64());
    opens(&big);
}

#[test]
fn header_bytes_are_covered_by_the_checksum() {
    let mut b = store().to_vec();
    // A digit of the config inside the JSON, changed without resealing.
    let at = PREAMBLE_LEN + 40;
    b[at] ^= 0x01;
    refused(&b, &["header checksum mismatch", "corrupt"]);
    let mut b = store().to_vec();
    b[20] ^= 0x80;
    refused(&b, &["header checksum mismatch"]);
}

#[test]
fn a_version_2_file_asks_for_requantizing() {
    let mut b = store().to_vec();
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    refused(&b, &["version 2 .emoe", "re-quantize"]);
}

#[test]
fn invalid_embedded_configs_are_refused() {
    let cases: [(&str, Value, &[&str]); 8] = [
        (
            "num_kv_heads",
            json!(0),
            &["`num_key_value_heads`", "must be positive"],
        ),
        (
            "num_kv_heads",
            json!(3),
            &["`num_key_value_heads`", "does not divide"],
        ),
        ("head_dim", json!(1), &["`head_dim`", "even for RoPE"]),
        ("head_dim", json!(0), &["`head_dim`", "must be positive"]),
        (
            "top_k",
            json!(0),
            &["`num_experts_per_tok`", "not in 1..=8"],
        ),
        (
            "top_k",
            json!(9),
            &["`num_experts_per_tok`", "not in 1..=8"],
        ),
        (
            "sliding_window",
            json!(0),
            &["`sliding_window`", "positive or null"],
        ),
        (
            "num_layers",
            json!(5),
            &["`num_hidden_layers`", "layer kinds"],
        ),
    ];
    for (field, value, want) in cases {
        let b = craft(store(), |h| h["config"][field] = value.clone());
        let mut all = vec!["embedded config field"];
        all.extend_from_slice(want);
        refused(&b, &all);
        // The container alone is refused too: the config is validated at parse time.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.emoe");
        std::fs::write(&p, &b).unwrap();
        assert!(EmoeFile::open(&p).is_err(), "{field} = {value}");
    }
    let b = craft(store(), |h| h["config"]["norm_eps"] = json!(-1.0));
    refused(&b, &["`rms_norm_eps`"]);
}

#[test]
fn a_config_that_disagrees_with_the_tensors_is_refused() {
    let table = "does not match the embedded config";
    // Shapes: hidden_size no longer that of the stored matrices.
    let b = craft(store(), |h| h["config"]["hidden_size"] = json!(64));
    refused(&b, &[table, "has shape"]);
    // Fewer experts than stored: the spare experts' blocks are out of the model's range.
    let b = craft(store(), |h| h["config"]["num_experts"] = json!(4));
    refused(&b, &["expert block (layer 0, expert 4)", "out of range"]);
    // A tensor the config needs is missing from the table.
    let b = craft(store(), |h| {
        h["tensors"]
            .as_array_mut()
            .unwrap()
            .retain(|t| t["name"] != "model.norm.weight")
    });
    refused(&b, &[table, "no tensor `model.norm.weight`"]);
    // A tensor the config does not use: a tied head makes the stored one extra.
    let b = craft(store(), |h| {
        h["config"]["tie_word_embeddings"] = json!(true)
    });
    refused(&b, &[table, "tensor `lm_head.", "is not part of the model"]);
    // A dtype the loader does not take for a norm (same byte count, so the layout holds).
    let b = craft(store(), |h| {
        tensor(h, "model.norm.weight")["dtype"] = json!("I32")
    });
    refused(&b, &[table, "model.norm.weight", "dtype I32"]);
}

/// The head transform is there exactly when the config says so, hidden × hidden f32, and only
/// for a tied head.
#[test]
fn the_head_transform_must_match_the_config() {
    let table = "does not match the embedded config";
    let g = "model.norm.transform.weight";
    assert!(opens(tied_store()).weights.head_transform.is_some());
    // Stored but not in the config: extra.
    let b = craft(tied_store(), |h| {
        h["config"]["head_transform"] = json!(false)
    });
    refused(
        &b,
        &[
            table,
            "tensor `model.norm.transform.",
            "is not part of the model",
        ],
    );
    // In the config but not stored: missing.
    let b = craft(tied_store(), |h| {
        h["tensors"]
            .as_array_mut()
            .unwrap()
            .retain(|t| t["name"] != g)
    });
    refused(&b, &[table, "no tensor `model.norm.transform.weight`"]);
    // The wrong dtype (same byte count) and the wrong shape (same element count).
    let b = craft(tied_store(), |h| tensor(h, g)["dtype"] = json!("I32"));
    refused(&b, &[table, g, "dtype I32"]);
    let b = craft(tied_store(), |h| tensor(h, g)["shape"] = json!([32, 128]));
    refused(&b, &[table, g, "has shape"]);
    // A transform with an untied head is not a model quantize writes.
    let b = craft(tied_store(), |h| {
        h["config"]["tie_word_embeddings"] = json!(false)
    });
    refused(
        &b,
        &[
            "embedded config field",
            "`head_transform`",
            "tied word embeddings",
        ],
    );
}

#[test]
fn an_experts_tensors_must_lie_in_its_own_block() {
    let h = header(store());
    let blocks = h["blocks"].as_array().unwrap();
    let (a, b) = (0, 1);
    assert_eq!(
        (&blocks[a]["layer"], &blocks[b]["layer"]),
        (&json!(0), &json!(0))
    );
    // Swap which expert two blocks claim to hold: every byte is still in place and checksummed.
    let bytes = craft(store(), |h| {
        let ea = h["blocks"][a]["expert"].clone();
        h["blocks"][a]["expert"] = h["blocks"][b]["expert"].clone();
        h["blocks"][b]["expert"] = ea;
    });
    refused(
        &bytes,
        &[
            "does not match the embedded config",
            "is not inside its expert block (layer 0, expert",
        ],
    );
}

/// The table check accepts what the writer writes, for every architecture and quantized or not.
#[test]
fn stores_of_every_fixture_architecture_open() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for name in [
        "mixtral-tiny",
        "qwen2moe-tiny",
        "qwen2moe-tiny-normtopk",
        "opt-tiny",
        "opt-tiny-proj",
        "qwen3moe-tiny",
        "qwen3moe-tiny-step2",
        "olmoe-tiny",
        "olmoe-tiny-normtopk",
        "granitemoe-tiny",
        "granitemoeshared-tiny",
        "glm4moe-tiny",
        "glm4moe-tiny-plain",
        "gptoss-tiny",
        "gptoss-tiny-legacy",
        "deepseekv2-tiny",
        "deepseekv3-tiny",
        "deepseekv3-tiny-plain",
        "llama-tiny",
    ] {
        let model = Model::load(&root.join(name)).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let plain = tmp.path().join("plain.emoe");
        write_emoe(&model, json!({"method": "none"}), &plain).unwrap();
        Model::load(&plain).unwrap_or_else(|e| panic!("{name}: {e}"));
        let opts = QuantOptions {
            threads: 1,
            ..QuantOptions::new(Method::Rtn, &model)
        };
        let (q, _) = quant::quantize(model, &[], 0, &opts, |_, _, _| {}).unwrap();
        let rtn = tmp.path().join("rtn.emoe");
        write_emoe(&q, json!({"method": "rtn"}), &rtn).unwrap();
        Model::load(&rtn).unwrap_or_else(|e| panic!("{name} (rtn): {e}"));
    }
}
