//! Bad input exits non-zero with one clear line naming the problem, never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A private copy of a fixture to break.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

/// Runs `edgemoe generate` on `model` and returns its stderr, asserting a clean failure.
fn expect_failure(model: &Path, must_mention: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_edgemoe"))
        .args(["generate", "--prompt", "hi", "-n", "1", "--model"])
        .arg(model)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for m in must_mention {
        assert!(lines[0].contains(m), "{:?} should mention {m:?}", lines[0]);
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(json.as_object_mut().unwrap());
    std::fs::write(path, serde_json::to_string(&json).unwrap()).unwrap();
}

#[test]
fn missing_model_directory() {
    expect_failure(
        Path::new("/nonexistent/model"),
        &["/nonexistent/model", "no such file"],
    );
}

#[test]
fn missing_weights_file() {
    let d = copy_fixture("opt-tiny");
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    expect_failure(d.path(), &["model.safetensors"]);
}

#[test]
fn truncated_safetensors() {
    let d = copy_fixture("mixtral-tiny");
    let path = d.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    expect_failure(
        d.path(),
        &["model.safetensors", "past the end", "truncated"],
    );
}

#[test]
fn header_length_past_the_end() {
    let d = copy_fixture("mixtral-tiny");
    let path = d.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&(50_000_000u64).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    expect_failure(
        d.path(),
        &[
            "model.safetensors",
            "header length 50000000 points past the end",
        ],
    );
}

#[test]
fn tensor_offsets_past_the_end() {
    let d = copy_fixture("opt-tiny");
    let path = d.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&header).unwrap();
    // Point the last tensor's range 4 bytes past the data, keeping its size.
    let last = json
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .max_by_key(|(_, v)| v["data_offsets"][1].as_u64().unwrap())
        .map(|(k, _)| k.clone())
        .unwrap();
    let offs = json[&last]["data_offsets"].clone();
    json[&last]["data_offsets"] =
        serde_json::json!([offs[0].as_u64().unwrap() + 4, offs[1].as_u64().unwrap() + 4]);
    let mut new_header = serde_json::to_string(&json).unwrap();
    while new_header.len() < n {
        new_header.push(' ');
    }
    let mut out = (new_header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(new_header.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&path, out).unwrap();
    expect_failure(
        d.path(),
        &["model.safetensors", &last, "past the end of the data"],
    );
}

#[test]
fn config_missing_architecture() {
    let d = copy_fixture("mixtral-tiny");
    edit_config(d.path(), |c| {
        c.remove("architectures");
        c.remove("model_type");
    });
    expect_failure(d.path(), &["config.json", "architectures", "missing"]);
}

#[test]
fn config_missing_shape_field_is_named() {
    let d = copy_fixture("mixtral-tiny");
    // The default hidden_size (4096) then disagrees with the weights: the error names both.
    edit_config(d.path(), |c| {
        c.remove("hidden_size");
    });
    expect_failure(
        d.path(),
        &["hidden_size", "has shape [64], expected [4096]"],
    );
}

#[test]
fn config_not_json() {
    let d = copy_fixture("opt-tiny");
    std::fs::write(d.path().join("config.json"), "{ nope").unwrap();
    expect_failure(d.path(), &["config.json", "not valid JSON"]);
}

#[test]
fn unknown_architecture() {
    let d = copy_fixture("mixtral-tiny");
    edit_config(d.path(), |c| {
        c.insert(
            "architectures".into(),
            serde_json::json!(["GPT2LMHeadModel"]),
        );
    });
    expect_failure(d.path(), &["unsupported architecture", "GPT2LMHeadModel"]);
}

/// A GGUF cut short fails in one line naming the file format and the truncation.
#[test]
fn truncated_gguf() {
    let src =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-tiny/llama-tiny.gguf");
    let bytes = std::fs::read(src).unwrap();
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("cut.gguf");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    expect_failure(&path, &["cut.gguf", "GGUF", "truncated"]);
}

#[test]
fn missing_tokenizer() {
    let d = copy_fixture("qwen2moe-tiny");
    std::fs::remove_file(d.path().join("tokenizer.json")).unwrap();
    expect_failure(d.path(), &["tokenizer.json", "tokenizer"]);
}

#[test]
fn corrupt_tokenizer() {
    let d = copy_fixture("qwen2moe-tiny");
    std::fs::write(d.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
    expect_failure(d.path(), &["tokenizer.json", "not a valid tokenizer.json"]);
}

/// Negative numbers are values: out of range, not unknown flags.
#[test]
fn negative_sampling_values_are_range_errors() {
    for (flag, want) in [("--temp", "--temp must be"), ("--top-p", "--top-p must be")] {
        let out = Command::new(env!("CARGO_BIN_EXE_edgemoe"))
            .args(["generate", "--prompt", "hi", "-n", "1", flag, "-1"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains(want), "{flag}: {stderr}");
    }
}

/// Absurd thread counts, a zero batch and a directory that is no checkpoint are refused with
/// one clear line, and an OS error is said once.
#[test]
fn absurd_options_and_missing_files_are_refused_clearly() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_edgemoe"))
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = run(&["generate", "--prompt", "x", "--threads", "100000"]);
    assert!(e.contains("too many") && e.contains("cores"), "{e}");
    let e = run(&[
        "bench",
        "--plot",
        "/nonexistent-dir/p.svg",
        "-p",
        "8",
        "-n",
        "8",
    ]);
    assert!(e.contains("not a file in an existing directory"), "{e}");
    // An API key on the stdin protocol would protect nothing.
    let e = run(&["serve", "--api-key", "k"]);
    assert!(e.contains("--http"), "{e}");
    // Paging options do nothing without a budget: asking for them alone is a mistake.
    let e = run(&["generate", "--prompt", "x", "--expert-policy", "lru"]);
    assert!(e.contains("--mem"), "{e}");
    // quantize's own pool once started them one by one (over 100 s, no message).
    let out = tempfile::tempdir().unwrap();
    let q = out.path().join("q.emoe");
    let e = run(&[
        "quantize",
        "--method",
        "rtn",
        "--threads",
        "100000",
        "--model",
        fixture("llama-tiny").to_str().unwrap(),
        "--out",
        q.to_str().unwrap(),
    ]);
    assert!(e.contains("too many") && e.contains("cores"), "{e}");
    assert!(!q.exists());
    let e = run(&[
        "quantize",
        "--method",
        "rtn",
        "--keep-f32",
        "self_atn",
        "--model",
        fixture("llama-tiny").to_str().unwrap(),
        "--out",
        q.to_str().unwrap(),
    ]);
    assert!(e.contains("\"self_atn\" matches no linear"), "{e}");
    assert!(!q.exists());
    // A dense model has no routed experts: --bits 4 alone would quantize nothing to 4 bits.
    let e = run(&[
        "quantize",
        "--method",
        "rtn",
        "--bits",
        "4",
        "--model",
        fixture("llama-tiny").to_str().unwrap(),
        "--out",
        q.to_str().unwrap(),
    ]);
    assert!(e.contains("has none") && e.contains("--int4 NAME"), "{e}");
    assert!(!q.exists());
    let calib = out.path().join("calib.txt");
    std::fs::write(
        &calib,
        "In the beginning God created the heaven and the earth.",
    )
    .unwrap();
    let e = run(&[
        "quantize",
        "--calib-tokens",
        "0",
        "--calib",
        calib.to_str().unwrap(),
        "--model",
        fixture("llama-tiny").to_str().unwrap(),
        "--out",
        q.to_str().unwrap(),
    ]);
    assert!(e.contains("--calib-tokens must be at least 2"), "{e}");
    assert!(!q.exists());
    let e = run(&["serve", "--max-batch", "0"]);
    assert!(e.contains("batch size from 1"), "{e}");
    // bench ran past the context: -p 99999999 aborted on a 102 GB allocation, -n 99999999
    // decoded for hours, -b 100000 allocated a cache per sequence first.
    for (flag, value, want) in [
        ("-p", "99999999", "context of 4096"),
        ("-n", "99999999", "context of 4096"),
        ("-b", "100000", "at most 4096"),
    ] {
        let e = run(&["bench", "-r", "1", flag, value]);
        assert!(e.contains(want) && !e.contains("panicked"), "{flag}: {e}");
    }
    let empty = tempfile::tempdir().unwrap();
    let e = run(&[
        "generate",
        "--prompt",
        "x",
        "--model",
        empty.path().to_str().unwrap(),
    ]);
    assert!(
        e.contains("no config.json") && e.contains("tokenizer.json"),
        "{e}"
    );
    let e = run(&["generate", "--prompt", "x", "--model", "/nonexistent/model"]);
    assert_eq!(e.matches("no such file or directory").count(), 1, "{e}");
    // Mapping a directory said only "No such device (os error 19)".
    let e = run(&["inspect", empty.path().to_str().unwrap()]);
    assert!(e.contains("is a directory"), "{e}");
    let e = run(&["generate", "--prompt", "x", "--model", "/dev/null"]);
    assert!(e.contains("not a regular file"), "{e}");
    let file = empty.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let e = run(&[
        "export",
        "--model",
        "builtin:default",
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(e.contains("is not a directory"), "{e}");
    // Opening a FIFO with no writer blocked for ever.
    let fifo = empty.path().join("model.emoe");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path; mkfifo only creates the node.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let e = run(&["inspect", fifo.to_str().unwrap()]);
    assert!(e.contains("not a regular file"), "{e}");
}

/// quantize refuses an .emoe as input and an --out it cannot write, before any work, and
/// leaves no file behind.
#[test]
fn quantize_refuses_an_emoe_and_a_bad_out() {
    let tmp = tempfile::tempdir().unwrap();
    let emoe = tmp.path().join("m.emoe");
    let mut bytes = b"EDGEMOE\0".to_vec();
    bytes.extend_from_slice(&[0; 64]);
    std::fs::write(&emoe, &bytes).unwrap();
    let run = |model: &Path, out: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_edgemoe"))
            .args(["quantize", "--method", "rtn", "--model"])
            .arg(model)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = run(&emoe, &tmp.path().join("again.emoe"));
    assert!(e.contains("already quantized"), "{e}");
    let e = run(
        &fixture("trained-moe"),
        &tmp.path().join("no/such/dir/m.emoe"),
    );
    assert!(e.contains("does not exist"), "{e}");
    let e = run(&fixture("trained-moe"), tmp.path());
    assert!(e.contains("is a directory"), "{e}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "only the input remains");
}
