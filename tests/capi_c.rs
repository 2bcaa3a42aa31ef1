//! Compiles tests/c/generate.c against include/edgemoe.h and the staticlib cargo built beside this
//! test (the lib's crate types include `staticlib`, so `cargo test` always builds it), runs it on
//! the trained fixture and checks what it prints: the greedy text byte-identical to the Rust
//! API's, and the error conventions (NULL arguments, freed handles, short buffers, stop, cancel).

#![cfg(any(target_os = "linux", target_os = "macos"))]

use edgemoe::engine::generation::{generate, GenerateRequest};
use edgemoe::engine::sampling::SamplingParams;
use edgemoe::kv::plan::bytes_per_token;
use edgemoe::kv::{Budget, KvOptions, Policy};
use edgemoe::Engine;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

const PROMPT: &str = "In the beginning God created";
const MAX_TOKENS: usize = 40;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The trained fixture, or the random tiny Mixtral where the trained one is not checked in.
fn model_dir() -> PathBuf {
    let trained = root().join("tests/fixtures/trained-moe");
    if trained.is_dir() {
        trained
    } else {
        root().join("tests/fixtures/mixtral-tiny")
    }
}

/// The newest `libedgemoe.a` of `target/<profile>/` and its `deps/`: this test runs from
/// `target/<profile>/deps/`.
fn staticlib() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("the test binary's directory");
    let candidates = [
        deps.parent().map(|p| p.join("libedgemoe.a")),
        Some(deps.join("libedgemoe.a")),
    ];
    // `cargo test` writes deps/; `cargo build` also copies it up a level. After a `cargo build`
    // followed by source changes and `cargo test`, the copy above is stale: take the newest.
    candidates
        .into_iter()
        .flatten()
        .filter(|p| p.is_file())
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .unwrap_or_else(|| {
            panic!(
                "libedgemoe.a not found next to {} (is `staticlib` still in [lib] crate-type?)",
                exe.display()
            )
        })
}

/// The target triple this test was built for, which cc needs outside a build script.
fn target_triple() -> String {
    let arch = std::env::consts::ARCH;
    if cfg!(target_os = "macos") {
        format!("{arch}-apple-darwin")
    } else if cfg!(target_env = "musl") {
        format!("{arch}-unknown-linux-musl")
    } else {
        format!("{arch}-unknown-linux-gnu")
    }
}

/// Compiles and links the C program; returns the executable's path inside `dir`.
fn build_c_program(dir: &Path) -> PathBuf {
    let triple = target_triple();
    let compiler = cc::Build::new()
        .target(&triple)
        .host(&triple)
        .opt_level(1)
        .debug(false)
        .cargo_metadata(false)
        .cargo_warnings(false)
        .get_compiler();
    let exe = dir.join("generate");
    let mut cmd = compiler.to_command();
    cmd.arg("-Wall")
        .arg("-Wextra")
        .arg("-I")
        .arg(root().join("include"))
        .arg(root().join("tests/c/generate.c"))
        .arg("-o")
        .arg(&exe)
        .arg(staticlib());
    // What `rustc --print native-static-libs` asks for besides the C library.
    if cfg!(target_os = "linux") {
        cmd.args(["-lgcc_s", "-lpthread", "-ldl", "-lm"]);
    } else {
        cmd.args(["-lpthread", "-lm", "-framework", "CoreFoundation"]);
    }
    let out = cmd.output().expect("failed to run the C compiler");
    assert!(
        out.status.success(),
        "compiling tests/c/generate.c failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Report(BTreeMap<String, String>);

impl Report {
    fn get(&self, key: &str) -> &str {
        self.0
            .get(key)
            .unwrap_or_else(|| panic!("the C program printed no `{key}=`"))
    }

    fn code(&self, key: &str, want: i32) {
        assert_eq!(self.get(key), want.to_string(), "{key}");
    }
}

#[test]
fn c_program_generates_what_the_rust_api_generates() {
    let dir = tempfile::tempdir().unwrap();
    let exe = build_c_program(dir.path());
    let model_dir = model_dir();
    let out = Command::new(&exe)
        .arg(&model_dir)
        .arg(PROMPT)
        .arg(MAX_TOKENS.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the C program failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let r = Report(
        stdout
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );

    // The reference: the Rust API on the same model, greedy.
    let model = Arc::new(edgemoe::load_model(Some(&model_dir)).unwrap());
    let engine = Engine::new(model.clone(), 2).unwrap();
    let req = GenerateRequest {
        prompt: PROMPT.to_string(),
        max_tokens: MAX_TOKENS,
        sampling: SamplingParams::default(),
        stop: Vec::new(),
    };
    let want = generate(&engine, &req, |_| true).unwrap().text;
    assert!(!want.is_empty(), "the reference generated nothing");
    let want_hex = hex(want.as_bytes());
    let prompt_ids = model.tokenizer.encode(PROMPT, true).unwrap();

    assert_eq!(r.get("version"), env!("CARGO_PKG_VERSION"));
    r.code("load_rc", 0);
    r.code("vocab_rc", 0);
    assert_eq!(r.get("vocab_size"), model.config.vocab_size.to_string());

    // Greedy text: byte-identical, whether collected from the buffer or from the callback.
    r.code("generate_rc", 0);
    assert_eq!(
        r.get("text_hex"),
        want_hex,
        "C text differs from the Rust API's"
    );
    assert_eq!(r.get("streamed_hex"), want_hex, "callback pieces differ");
    assert_eq!(r.get("text_strlen_matches"), "1");
    for t in ["thread0", "thread1"] {
        r.code(&format!("{t}_rc"), 0);
        assert_eq!(r.get(&format!("{t}_hex")), want_hex, "{t}");
    }
    r.code("orphan_rc", 0);
    assert_eq!(
        r.get("orphan_hex"),
        want_hex,
        "a session after its model was freed"
    );
    r.code("after_cancel_rc", 0);
    assert_eq!(r.get("after_cancel_hex"), want_hex);

    // A KV budget: lazy at 50% with W = 8 gives the Rust engine's text with the same options.
    let kv = KvOptions {
        policy: Policy::Lazy,
        budget: Some(Budget::Percent(50.0)),
        window: 8,
        sinks: 4,
        ..KvOptions::default()
    };
    let mut lazy_engine = Engine::new(model.clone(), 2).unwrap();
    lazy_engine.set_kv_options(kv).unwrap();
    let lazy = generate(&lazy_engine, &req, |_| true).unwrap();
    // The budget was evicted into: half of prompt + max tokens, fewer than the tokens run.
    let budget = (prompt_ids.len() + MAX_TOKENS) / 2;
    assert!(lazy.prompt_tokens + lazy.completion_tokens > budget);
    let per_token = bytes_per_token(
        model.config.num_layers,
        model.config.kv_layout(),
        Policy::Lazy,
    );
    assert_eq!(lazy.kv_bytes as u64, budget as u64 * per_token);
    r.code("kv_lazy_session_rc", 0);
    r.code("kv_lazy_rc", 0);
    assert_eq!(
        r.get("kv_lazy_hex"),
        hex(lazy.text.as_bytes()),
        "the C session's lazy-KV text differs from the Rust engine's"
    );
    for (key, says) in [
        ("kv_bad_policy", "kv_policy is 9"),
        ("kv_both_budgets", "both set"),
        ("kv_too_small", "at least 132 tokens"),
        ("kv_full_with_budget", "takes no KV budget"),
        ("kv_h2o_no_budget", "kv_policy h2o needs"),
        ("kv_zero_window", "kv_window is 0"),
        ("kv_bad_threshold", "kv_threshold is -1"),
        ("kv_bad_percent", "kv_budget_percent is 150"),
        ("kv_bad_granularity", "kv_granularity is 7"),
    ] {
        r.code(&format!("{key}_rc"), 4);
        assert_eq!(r.get(&format!("{key}_null")), "1", "{key}");
        let err = r.get(&format!("{key}_error"));
        assert!(err.contains(says), "{key}: {err}");
    }
    r.code("kv_tiny_session_rc", 0);
    r.code("kv_tiny_generate_rc", 4);
    assert!(r.get("kv_tiny_generate_error").contains("too small"));
    // The C test builds against the default (no `cuda`) library: a GPU tier is refused.
    r.code("gpu_mem_session_rc", 4);
    assert!(r.get("gpu_mem_session_error").contains("cuda"));
    assert_eq!(r.get("gpu_mem_session_null"), "1");
    r.code("set_gpu_mem_rc", 4);
    assert!(r.get("set_gpu_mem_error").contains("--gpu-mem"));

    // Tokenize and detokenize agree with the Rust tokenizer; short buffers report the size.
    let ids: Vec<String> = prompt_ids.iter().map(u32::to_string).collect();
    assert_eq!(r.get("tokens"), ids.join(","));
    r.code("tokenize_rc", 0);
    r.code("tokenize_query_rc", 5);
    r.code("tokenize_small_rc", 5);
    assert_eq!(r.get("tokenize_small_n"), prompt_ids.len().to_string());
    let decoded = model.tokenizer.decode(&prompt_ids);
    r.code("detokenize_rc", 0);
    assert_eq!(r.get("detokenize_hex"), hex(decoded.as_bytes()));
    r.code("detokenize_small_rc", 5);
    assert_eq!(r.get("detokenize_small_n"), decoded.len().to_string());
    assert!(r.get("detokenize_small_strlen").parse::<usize>().unwrap() <= 2);
    r.code("detokenize_bad_token_rc", 4);

    // A short output buffer: generation completes, a prefix is written, the length reported.
    r.code("generate_small_rc", 5);
    assert_eq!(r.get("generate_small_n"), want.len().to_string());
    let small = r.get("generate_small_hex");
    assert!(small.len() <= 10 && want_hex.starts_with(small), "{small}");

    // Stopping from the callback, cancelling, re-entering a busy session.
    r.code("stop3_rc", 0);
    r.code("stop3_pieces", 3);
    let stop3 = r.get("stop3_hex");
    assert!(
        want_hex.starts_with(stop3) && stop3.len() < want_hex.len(),
        "{stop3}"
    );
    r.code("cancel_rc", 6);
    r.code("cancel_pieces", 2);
    r.code("reenter_outer_rc", 0);
    r.code("reenter_rc", 7);

    // Loading a missing path fails with a message naming it.
    r.code("missing_load_rc", 3);
    assert_eq!(r.get("missing_load_handle_null"), "1");
    assert!(r
        .get("missing_load_error")
        .contains("/nonexistent/edgemoe-model"));

    // NULL and bad arguments.
    for key in [
        "null_out_load_rc",
        "null_prompt_rc",
        "null_session_rc",
        "null_model_tokenize_rc",
        "null_text_tokenize_rc",
        "null_n_out_tokenize_rc",
        "null_buf_with_cap_rc",
        "null_out_session_rc",
    ] {
        r.code(key, 1);
    }
    r.code("bad_temperature_rc", 4);
    r.code("invalid_utf8_rc", 4);
    r.code("model_as_session_rc", 2);
    r.code("free_null_rc", 0);

    // Freed handles are detected, not dereferenced.
    r.code("session_free_rc", 0);
    r.code("freed_session_generate_rc", 2);
    r.code("freed_session_cancel_rc", 2);
    r.code("double_free_session_rc", 2);
    assert!(r.get("freed_error").contains("EdgemoeSession"));
    r.code("model_free_rc", 0);
    r.code("freed_model_tokenize_rc", 2);
    r.code("double_free_model_rc", 2);
    r.code("orphan_free_rc", 0);
}
