//! The whole open path on arbitrary bytes: `Model::load` of an .emoe, a GGUF file or a
//! safetensors checkpoint (config and tokenizer from the llama-tiny fixture), then two tokens
//! through the engine when it opens. It may fail, never panic, read out of bounds (the build
//! runs under AddressSanitizer) or allocate what the file does not hold (run with
//! `-malloc_limit_mb=64`).
//!
//! The first input byte picks the format (low two bits) and, for an .emoe, whether the header
//! checksum is recomputed over the mutated header (bit 7), so mutations reach the checks behind
//! it. Seed the corpus with real files: `cargo test --release --test open_fuzz -- --ignored`.

#![no_main]

use edgemoe::engine::{BatchItem, Engine, Logits};
use edgemoe::model::emoe::PREAMBLE_LEN;
use edgemoe::Model;
use libfuzzer_sys::fuzz_target;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// A scratch directory per fuzzing process, with the checkpoint's side files in place.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("edgemoe-fuzz-{}", std::process::id()));
        let ckpt = dir.join("ckpt");
        std::fs::create_dir_all(&ckpt).expect("scratch directory");
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama-tiny");
        for f in ["config.json", "tokenizer.json"] {
            std::fs::copy(fixture.join(f), ckpt.join(f)).expect("llama-tiny fixture");
        }
        dir
    })
}

/// The .emoe header checksum recomputed over the header as it now is.
fn reseal(b: &mut [u8]) {
    let Some(len) = b.get(12..20).map(|l| u64::from_le_bytes(l.try_into().unwrap())) else {
        return;
    };
    let end = usize::try_from(len)
        .ok()
        .and_then(|l| PREAMBLE_LEN.checked_add(l))
        .filter(|&e| e <= b.len());
    if let Some(end) = end {
        let crc = crc32c::crc32c(&b[PREAMBLE_LEN..end]);
        b[20..24].copy_from_slice(&crc.to_le_bytes());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let dir = scratch();
    let mut bytes = rest.to_vec();
    let (file, target) = match sel & 3 {
        0 | 3 => {
            if sel & 0x80 != 0 {
                reseal(&mut bytes);
            }
            (dir.join("m.emoe"), dir.join("m.emoe"))
        }
        1 => (dir.join("m.gguf"), dir.join("m.gguf")),
        _ => (dir.join("ckpt/model.safetensors"), dir.join("ckpt")),
    };
    std::fs::write(&file, &bytes).expect("scratch write");
    let Ok(model) = Model::load(&target) else {
        return;
    };
    let Ok(engine) = Engine::new(Arc::new(model), 1) else {
        return;
    };
    let mut cache = engine.new_cache_for(2);
    let _ = engine.forward(&mut [BatchItem {
        tokens: &[1, 2],
        cache: &mut cache,
        logits: Logits::Last,
    }]);
});
