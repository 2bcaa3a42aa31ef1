//! The model's context, treated the same by `generate`, `ppl` and `serve`: a prompt that fills
//! it is refused before any work with the numbers in the message; a completion that reaches it
//! stops there with finish reason `length`, keeping its text (OPT, with learned positions, used
//! to fail midway and lose it).

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn edgemoe(args: &[&str], model: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_edgemoe"))
        .args(args)
        .arg("--model")
        .arg(fixture(model))
        .args(["--threads", "1"])
        .output()
        .unwrap()
}

#[test]
fn generation_stops_at_the_context_with_length() {
    // opt-tiny-proj: learned positions, a context of 128 tokens; sampling so no EOS ends it early.
    let out = edgemoe(
        &[
            "generate",
            "--json",
            "--prompt",
            "hello world",
            "-n",
            "1000",
            "--temp",
            "1",
            "--seed",
            "3",
        ],
        "opt-tiny-proj",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (p, c) = (
        v["prompt_tokens"].as_u64().unwrap(),
        v["completion_tokens"].as_u64().unwrap(),
    );
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(p + c, 128, "{v}");
    assert!(!v["text"].as_str().unwrap().is_empty());
}

#[test]
fn a_prompt_past_the_context_is_refused_with_the_numbers() {
    let long = "And the LORD spake unto Moses, saying, ".repeat(80);
    let out = edgemoe(&["generate", "--prompt", &long, "-n", "4"], "trained-moe");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the model's context is 512 tokens") && err.contains("the prompt is"),
        "{err}"
    );
    assert!(
        !err.contains("tokens/s"),
        "work was done before refusing: {err}"
    );

    let out = edgemoe(
        &[
            "ppl",
            "--ctx",
            "1024",
            "--text",
            fixture("trained-moe/heldout.txt").to_str().unwrap(),
        ],
        "trained-moe",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("1024") && err.contains("context of 512 tokens"),
        "{err}"
    );
}
