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

/// The C API treats the context as `generate` does: a long completion stops at it with the
/// same text, a prompt that fills it is refused with the numbers.
#[test]
fn the_c_api_stops_and_refuses_at_the_context() {
    use edgemoe::capi::*;
    use std::ffi::{CStr, CString};
    let path = CString::new(fixture("opt-tiny-proj").to_str().unwrap()).unwrap();
    let (mut model, mut session) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: every pointer is a valid C string, out-pointer or NULL, as the C API asks.
    unsafe {
        assert_eq!(
            edgemoe_model_load(path.as_ptr(), std::ptr::null(), &mut model),
            EDGEMOE_OK
        );
        assert_eq!(
            edgemoe_session_new(model, std::ptr::null(), &mut session),
            EDGEMOE_OK
        );
        let mut params = edgemoe_generate_default_params();
        (params.max_tokens, params.temperature, params.seed) = (1000, 1.0, 3);
        let prompt = CString::new("hello world").unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0usize;
        let none = None;
        let rc = edgemoe_generate(
            session,
            prompt.as_ptr(),
            &params,
            none,
            std::ptr::null_mut(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut n,
        );
        assert_eq!(rc, EDGEMOE_OK, "{:?}", CStr::from_ptr(edgemoe_last_error()));
        let text = String::from_utf8(buf[..n].to_vec()).unwrap();
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
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(text, v["text"].as_str().unwrap());

        let long = CString::new("hello world ".repeat(100)).unwrap();
        let rc = edgemoe_generate(
            session,
            long.as_ptr(),
            &params,
            none,
            std::ptr::null_mut(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut n,
        );
        assert_eq!(rc, EDGEMOE_ERR_INVALID_INPUT);
        let err = CStr::from_ptr(edgemoe_last_error())
            .to_string_lossy()
            .into_owned();
        assert!(err.contains("the model's context is 128 tokens"), "{err}");
        edgemoe_session_free(session);
        edgemoe_model_free(model);
    }
}
