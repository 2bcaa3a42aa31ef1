//! GGUF `tokenizer.ggml.pre` names: the tokenizer edgemoe rebuilds from a GGUF gives, for each
//! name llama.cpp's converter writes for the MoE families (qwen2, deepseek-llm, deepseek-v3,
//! gpt-4o, glm4, olmo, refact, with gpt2, smollm and llama-bpe), the ids Hugging Face
//! `tokenizers` gives with the real checkpoints' normalizer and pre_tokenizer JSON. Fixtures
//! (one small BPE trained across word, digit and script boundaries, so each split shows in the
//! ids) from tools/make_pretok_fixtures.py; no Python at test time.

use edgemoe::model::gguf::GgufFile;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pretok")
}

fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(dir().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn each_pre_name_gives_the_checkpoints_ids() {
    let r = reference();
    let texts: Vec<&str> = r["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let ids = r["ids"].as_object().unwrap();
    assert_eq!(ids.len(), 10);
    // Every name checked before failing, so one wrong mapping does not hide another.
    let mut wrong = vec![];
    for (name, want) in ids {
        let f = GgufFile::open(&dir().join(format!("{name}.gguf"))).unwrap();
        let tok = f.tokenizer().unwrap_or_else(|e| panic!("{name}: {e}"));
        for (text, want) in texts.iter().zip(want.as_array().unwrap()) {
            let want: Vec<u32> = want
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let got = tok.encode(text, false).unwrap();
            if got != want {
                wrong.push(format!(
                    "pre `{name}` on {text:?}:\n  got  {got:?}\n  want {want:?}"
                ));
            }
            // Byte-level throughout: decoding gives the (normalized) text back.
            if !matches!(name.as_str(), "qwen2" | "olmo") {
                assert_eq!(tok.decode(&got), *text, "pre `{name}`");
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The names a converter writes for the same split agree; the test above covers one of each.
#[test]
fn aliases_rebuild_the_same_tokenizer() {
    let json = |name: &str| {
        let f = GgufFile::open(&dir().join(format!("{name}.gguf"))).unwrap();
        let tj: serde_json::Value = serde_json::from_str(&f.tokenizer_json().unwrap()).unwrap();
        (tj["normalizer"].clone(), tj["pre_tokenizer"].clone())
    };
    assert_eq!(json("glm4"), json("llama-bpe"));
    assert_eq!(json("refact"), json("smollm"));
    assert_ne!(json("qwen2"), json("llama-bpe"));
    assert_ne!(json("olmo"), json("gpt2"));
}

/// A name we do not know is refused by name, with the list we do.
#[test]
fn an_unknown_pre_name_is_one_clear_error() {
    let mut bytes = std::fs::read(dir().join("gpt2.gguf")).unwrap();
    // The key, its string type (8) and length (4), then the value: `gpt2` → `tekn`.
    let key = b"tokenizer.ggml.pre";
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("the pre key")
        + key.len()
        + 4
        + 8;
    assert_eq!(&bytes[at..at + 4], b"gpt2");
    bytes[at..at + 4].copy_from_slice(b"tekn");
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tekn.gguf");
    std::fs::write(&path, bytes).unwrap();
    let f = GgufFile::open(&path).unwrap();
    let err = f.tokenizer().err().expect("refused").to_string();
    assert!(
        err.contains("pre-tokenizer `tekn` is not supported"),
        "{err}"
    );
    assert!(
        err.contains("tokenizer.ggml.pre") && err.contains("deepseek-v3"),
        "{err}"
    );
}

/// A SentencePiece vocabulary (`tokenizer.ggml.model` = `llama`, Mixtral's): llama.cpp's
/// algorithm's ids (the best-scoring adjacent pair joined first, bytes for what the vocabulary
/// lacks), BOS first by default, and decoding gives the text back.
#[test]
fn sentencepiece_vocab_gives_llama_cpps_ids() {
    let r = reference();
    let spm = &r["spm"];
    let f = GgufFile::open(&dir().join("llama-spm.gguf")).unwrap();
    let tok = f.tokenizer().unwrap();
    let bos = spm["bos"].as_u64().unwrap() as u32;
    let texts = spm["texts"].as_array().unwrap();
    let ids = spm["ids"].as_array().unwrap();
    let mut bytes_used = false;
    for (text, want) in texts.iter().zip(ids) {
        let text = text.as_str().unwrap();
        let want: Vec<u32> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text, false).unwrap();
        assert_eq!(got, want, "{text:?}");
        assert_eq!(tok.decode(&got), text);
        let with_bos = tok.encode(text, true).unwrap();
        assert_eq!((with_bos[0], &with_bos[1..]), (bos, &want[..]));
        bytes_used |= got
            .iter()
            .any(|&i| tok.token_text(i).is_some_and(|t| t.starts_with("<0x")));
    }
    assert!(bytes_used, "no text fell back to byte tokens");
}
