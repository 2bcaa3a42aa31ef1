//! The whole open path on corrupt files, deterministically (the in-CI stand-in for
//! `cargo fuzz run open_model`): a few hundred seeded mutations each of two real .emoe files (the
//! mixtral-tiny fixture quantized, and the tied llama-tiny one rotated: its head reads the final
//! norm through a transform), a GGUF (llama-tiny's) and a safetensors checkpoint
//! (llama-tiny's), each opened with `Model::load` and, where that succeeds, run for two tokens.
//! Every outcome must be `Ok` or `Err`: a panic fails the test, and so does any single
//! allocation over [`CAP`] (the allocator refuses it, which aborts with Rust's "memory
//! allocation of N bytes failed"): no length field may make the reader allocate what the file
//! does not hold.

use edgemoe::engine::{BatchItem, Engine, Logits};
use edgemoe::model::emoe::PREAMBLE_LEN;
use edgemoe::quant::{self, store::write_emoe, Method, QuantOptions};
use edgemoe::util::rng::SplitMix64;
use edgemoe::Model;
use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The largest single allocation allowed: the files are under 2 MB, so anything near this is
/// a length field believed.
const CAP: usize = 64 << 20;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

struct Capped;

// SAFETY: forwards to the system allocator; refusing (null) is allowed by the contract.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > CAP {
            return std::ptr::null_mut();
        }
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > CAP {
            return std::ptr::null_mut();
        }
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > CAP {
            return std::ptr::null_mut();
        }
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Capped = Capped;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// How a format's bytes are laid out, for aiming mutations and keeping the .emoe's header
/// checksum valid on some of them.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Emoe,
    Gguf,
    Safetensors,
}

/// Where the header (metadata, tensor table) of `b` ends, at most `b.len()`.
fn header_end(kind: Kind, b: &[u8]) -> usize {
    let le64 = |at: usize| {
        b.get(at..at + 8)
            .map_or(0, |x| u64::from_le_bytes(x.try_into().unwrap()) as usize)
    };
    let end = match kind {
        Kind::Emoe => PREAMBLE_LEN.saturating_add(le64(12)),
        Kind::Safetensors => 8usize.saturating_add(le64(0)),
        Kind::Gguf => edgemoe::model::gguf::parse::parse(b).map_or(b.len(), |h| h.data_start),
    };
    end.min(b.len())
}

/// Stores the CRC-32C of an .emoe's header JSON as it now is, where it fits.
fn reseal(b: &mut [u8]) {
    let end = header_end(Kind::Emoe, b);
    if end > PREAMBLE_LEN && b.len() >= PREAMBLE_LEN {
        let crc = crc32c::crc32c(&b[PREAMBLE_LEN..end]);
        b[20..24].copy_from_slice(&crc.to_le_bytes());
    }
}

const INTERESTING: [u64; 14] = [
    0,
    1,
    2,
    7,
    31,
    64,
    4095,
    4096,
    1 << 31,
    1 << 32,
    1 << 40,
    1 << 63,
    u64::MAX,
    u64::MAX - 63,
];

fn pick(rng: &mut SplitMix64, n: usize) -> usize {
    (rng.next_u64() % n.max(1) as u64) as usize
}

/// One seeded corruption: a truncation, bit flips in the header/table (or anywhere), a length
/// or count overwritten with an edge value, or a number in a JSON header replaced.
fn mutate(kind: Kind, good: &[u8], rng: &mut SplitMix64) -> (Vec<u8>, &'static str) {
    let hdr = header_end(kind, good).max(1);
    let mut b = good.to_vec();
    let what = match rng.next_u64() % 6 {
        0 => {
            let cut = if rng.next_u64().is_multiple_of(2) {
                pick(rng, hdr + 1)
            } else {
                pick(rng, good.len() + 1)
            };
            b.truncate(cut);
            "truncated"
        }
        1 => {
            for _ in 0..1 + pick(rng, 8) {
                let i = pick(rng, hdr);
                b[i] ^= 1 << pick(rng, 8);
            }
            "bits flipped in the header"
        }
        2 => {
            let i = pick(rng, hdr.saturating_sub(8));
            let v = INTERESTING[pick(rng, INTERESTING.len())];
            let n = 8.min(b.len() - i);
            b[i..i + n].copy_from_slice(&v.to_le_bytes()[..n]);
            "a u64 in the header overwritten"
        }
        3 => {
            let i = pick(rng, hdr.saturating_sub(4));
            let v = INTERESTING[pick(rng, INTERESTING.len())] as u32;
            let n = 4.min(b.len() - i);
            b[i..i + n].copy_from_slice(&v.to_le_bytes()[..n]);
            "a u32 in the header overwritten"
        }
        4 if kind != Kind::Gguf => {
            b = replace_json_number(kind, good, rng);
            "a number in the header JSON replaced"
        }
        _ => {
            for _ in 0..1 + pick(rng, 16) {
                let i = pick(rng, b.len());
                b[i] ^= 1 << pick(rng, 8);
            }
            "bits flipped anywhere"
        }
    };
    if kind == Kind::Emoe && rng.next_u64().is_multiple_of(2) {
        // Past the header checksum, to the checks behind it.
        reseal(&mut b);
    }
    (b, what)
}

/// A number in the JSON header (an offset, a length, a shape, a config field) replaced by an
/// edge value or a random one; the length field is fixed up.
fn replace_json_number(kind: Kind, good: &[u8], rng: &mut SplitMix64) -> Vec<u8> {
    let (start, len_at) = match kind {
        Kind::Emoe => (PREAMBLE_LEN, 12),
        _ => (8, 0),
    };
    let end = header_end(kind, good);
    let text = &good[start..end];
    let digits: Vec<usize> = (0..text.len())
        .filter(|&i| text[i].is_ascii_digit() && (i == 0 || !text[i - 1].is_ascii_digit()))
        .collect();
    if digits.is_empty() {
        return good.to_vec();
    }
    let s = digits[pick(rng, digits.len())];
    let e = s + text[s..].iter().take_while(|c| c.is_ascii_digit()).count();
    let v = if rng.next_u64().is_multiple_of(2) {
        INTERESTING[pick(rng, INTERESTING.len())].to_string()
    } else {
        (rng.next_u64() % (2 * good.len() as u64)).to_string()
    };
    let mut json = text[..s].to_vec();
    json.extend_from_slice(v.as_bytes());
    json.extend_from_slice(&text[e..]);
    let mut out = good[..start].to_vec();
    out[len_at..len_at + 8].copy_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&good[end..]);
    out
}

/// Opens `bytes` as a model of `kind` from `dir` and, on success, runs two tokens.
fn open(kind: Kind, bytes: &[u8], dir: &Path) -> Result<(), String> {
    let path = match kind {
        Kind::Emoe => dir.join("m.emoe"),
        Kind::Gguf => dir.join("m.gguf"),
        Kind::Safetensors => dir.join("ckpt/model.safetensors"),
    };
    std::fs::write(&path, bytes).unwrap();
    let target = match kind {
        Kind::Safetensors => dir.join("ckpt"),
        _ => path,
    };
    let model = Model::load(&target).map_err(|e| e.to_string())?;
    let engine = Engine::new(Arc::new(model), 1).map_err(|e| e.to_string())?;
    let mut cache = engine.new_cache_for(2);
    engine
        .forward(&mut [BatchItem {
            tokens: &[1, 2],
            cache: &mut cache,
            logits: Logits::Last,
        }])
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Runs `n` mutations of `good`; returns how many opened.
fn survive(kind: Kind, good: &[u8], n: usize, seed: u64, dir: &Path) -> usize {
    open(kind, good, dir).expect("the unmutated file opens");
    let mut rng = SplitMix64::new(seed);
    let mut opened = 0;
    for i in 0..n {
        let (b, what) = mutate(kind, good, &mut rng);
        let r = catch_unwind(AssertUnwindSafe(|| open(kind, &b, dir)));
        match r {
            Ok(Ok(())) => opened += 1,
            Ok(Err(msg)) => {
                assert!(!msg.is_empty() && !msg.contains('\n'), "{msg:?}");
                if std::env::var_os("OPEN_FUZZ_VERBOSE").is_some() {
                    eprintln!("{what}: {msg}");
                }
            }
            Err(_) => panic!("mutation {i} ({what}, seed {seed:#x}) panicked"),
        }
    }
    assert!(
        LARGEST.load(Ordering::Relaxed) <= CAP,
        "an allocation passed the cap"
    );
    opened
}

#[test]
fn every_opener_survives_seeded_mutations() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir(dir.join("ckpt")).unwrap();
    for f in ["config.json", "tokenizer.json", "generation_config.json"] {
        std::fs::copy(fixture("llama-tiny").join(f), dir.join("ckpt").join(f)).unwrap();
    }

    let model = Model::load(&fixture("mixtral-tiny")).unwrap();
    let opts = QuantOptions {
        threads: 1,
        ..QuantOptions::new(Method::Rtn, &model)
    };
    let (q, _) = quant::quantize(model, &[], 0, &opts, |_, _, _| {}).unwrap();
    let emoe = dir.join("good.emoe");
    write_emoe(&q, serde_json::json!({"method": "rtn"}), &emoe).unwrap();
    let emoe = std::fs::read(&emoe).unwrap();
    // A tied, rotated store: no lm_head, the head transform beside the final norm.
    let llama = Model::load(&fixture("llama-tiny")).unwrap();
    let opts = QuantOptions {
        threads: 1,
        ..QuantOptions::new(Method::Rtn, &llama)
    };
    let (q, _) = quant::quantize(llama, &[], 0, &opts, |_, _, _| {}).unwrap();
    assert!(q.config.head_transform);
    let tied = dir.join("tied.emoe");
    write_emoe(&q, serde_json::json!({"method": "rtn"}), &tied).unwrap();
    let tied = std::fs::read(&tied).unwrap();
    let gguf = std::fs::read(fixture("llama-tiny/llama-tiny.gguf")).unwrap();
    // The families whose GGUF configs and tensors have readers of their own.
    let mla = std::fs::read(fixture("deepseekv2-tiny/deepseekv2-tiny.gguf")).unwrap();
    let oss = std::fs::read(fixture("gptoss-tiny/gptoss-tiny.gguf")).unwrap();
    let st = std::fs::read(fixture("llama-tiny/model.safetensors")).unwrap();

    for (kind, good, seed) in [
        (Kind::Emoe, &emoe, 0x0e0e),
        (Kind::Emoe, &tied, 0x7e0e),
        (Kind::Gguf, &gguf, 0x6606),
        (Kind::Gguf, &mla, 0xd5e2),
        (Kind::Gguf, &oss, 0x0550),
        (Kind::Safetensors, &st, 0x5afe),
    ] {
        let n = 400;
        let opened = survive(kind, good, n, seed, dir);
        eprintln!("{} bytes: {opened} of {n} mutations opened", good.len());
        // Most corruptions are caught; some are harmless (a flipped mantissa bit in the data).
        assert!(
            opened < n,
            "every mutation opened: the mutator is not reaching the parser"
        );
    }
}

/// Seeds `cargo fuzz run open_model` with one valid file per format (the first byte selects
/// the opener): `cargo test --release --test open_fuzz -- --ignored write_fuzz_seeds`.
#[test]
#[ignore = "writes fuzz/corpus/open_model/; run by hand before fuzzing"]
fn write_fuzz_seeds() {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/open_model");
    std::fs::create_dir_all(&out).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let model = Model::load(&fixture("llama-tiny")).unwrap();
    let emoe = tmp.path().join("m.emoe");
    write_emoe(&model, serde_json::json!({"method": "none"}), &emoe).unwrap();
    for (sel, name, path) in [
        (0x80u8, "emoe", emoe),
        (1, "gguf", fixture("llama-tiny/llama-tiny.gguf")),
        (2, "safetensors", fixture("llama-tiny/model.safetensors")),
    ] {
        let mut b = vec![sel];
        b.extend(std::fs::read(path).unwrap());
        std::fs::write(out.join(name), b).unwrap();
    }
}
