//! The built-in trained model, made compact for embedding: tests/fixtures/trained-moe's f32
//! model.safetensors rewritten with every tensor rounded to bf16 (round to nearest, ties to
//! even, as `half::bf16::from_f32`), plus its config, generation config and tokenizer, all into
//! OUT_DIR/trained-moe/. The binary includes those files, so an installed copy needs no source
//! tree; the f32 fixture itself stays what the tests compare against.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

const FIXTURE: &str = "tests/fixtures/trained-moe";
const COPIED: [&str; 3] = ["config.json", "generation_config.json", "tokenizer.json"];

/// Ends the build with one clear message (a panic would add a backtrace hint to it).
fn fail(msg: &str) -> ! {
    eprintln!("error: embedding the built-in trained model: {msg}");
    std::process::exit(1);
}

pub fn embed() {
    let root = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let src = root.join(FIXTURE);
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_default()).join("trained-moe");
    println!("cargo:rerun-if-changed=build/trained.rs");
    fs::create_dir_all(&out).unwrap_or_else(|e| fail(&format!("{}: {e}", out.display())));
    for name in COPIED.iter().chain(&["model.safetensors"]) {
        println!("cargo:rerun-if-changed={}", src.join(name).display());
    }
    for name in COPIED {
        let from = src.join(name);
        fs::copy(&from, out.join(name))
            .unwrap_or_else(|e| fail(&format!("{}: {e}", from.display())));
    }
    let f32_path = src.join("model.safetensors");
    let bytes =
        fs::read(&f32_path).unwrap_or_else(|e| fail(&format!("{}: {e}", f32_path.display())));
    let bf16 = to_bf16(&bytes).unwrap_or_else(|e| fail(&format!("{}: {e}", f32_path.display())));
    write(&out.join("model.safetensors"), &bf16);
}

fn write(path: &Path, bytes: &[u8]) {
    fs::write(path, bytes).unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())));
}

/// An all-F32 safetensors file rewritten as BF16: the same tensors in the same order, the header
/// padded with spaces so the data starts at a multiple of 8 bytes (every bf16 tensor is then
/// 2-byte aligned wherever the file is placed at an aligned address).
fn to_bf16(file: &[u8]) -> Result<Vec<u8>, String> {
    let len_bytes: [u8; 8] = file
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or("shorter than the 8-byte header length")?;
    let header_end = usize::try_from(u64::from_le_bytes(len_bytes))
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&end| end <= file.len())
        .ok_or("header length points past the end")?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&file[8..header_end]).map_err(|e| format!("header: {e}"))?;
    let data = &file[header_end..];
    // Tensors in file order, so the output tiles its data section the same way.
    let mut tensors: Vec<(String, usize, usize, serde_json::Value)> = Vec::new();
    let mut new_header = serde_json::Map::new();
    for (name, entry) in header {
        if name == "__metadata__" {
            new_header.insert(name, entry);
            continue;
        }
        if entry["dtype"] != "F32" {
            return Err(format!("tensor {name} is {}, not F32", entry["dtype"]));
        }
        let range = |i: usize| entry["data_offsets"][i].as_u64().map(|v| v as usize);
        let (Some(begin), Some(end)) = (range(0), range(1)) else {
            return Err(format!("tensor {name}: no data_offsets"));
        };
        if begin > end || end > data.len() || (end - begin) % 4 != 0 {
            return Err(format!("tensor {name}: bad data_offsets [{begin}, {end}]"));
        }
        tensors.push((name, begin, end, entry["shape"].clone()));
    }
    tensors.sort_by_key(|t| t.1);
    let mut out_data = Vec::with_capacity(data.len() / 2);
    for (name, begin, end, shape) in tensors {
        let at = out_data.len();
        for w in data[begin..end].chunks_exact(4) {
            let bits = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            out_data.extend_from_slice(&bf16_bits(bits).to_le_bytes());
        }
        let entry = serde_json::json!({
            "dtype": "BF16",
            "shape": shape,
            "data_offsets": [at, out_data.len()],
        });
        new_header.insert(name, entry);
    }
    let mut json = serde_json::to_vec(&new_header).map_err(|e| e.to_string())?;
    while !(8 + json.len()).is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + out_data.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&out_data);
    Ok(out)
}

/// The bf16 nearest to the f32 with these bits, ties to even; NaN stays NaN (made quiet).
fn bf16_bits(bits: u32) -> u16 {
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        return ((bits >> 16) | 0x0040) as u16;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}
