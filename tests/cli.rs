//! The command line as a user meets it: every option has help text, `generate` without
//! `--seed` samples with a fresh seed it prints (so the run can be repeated), and a reader that
//! goes away (`| head`) ends `generate` quietly.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};

#[test]
fn every_option_has_help() {
    let cli = edgemoe::cli::command();
    let mut missing = Vec::new();
    for sub in cli.get_subcommands() {
        for arg in sub.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                missing.push(format!("{} --{id}", sub.get_name()));
            }
        }
    }
    assert!(missing.is_empty(), "options without help: {missing:?}");
}

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trained-moe")
}

fn generate(extra: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edgemoe"))
        .args([
            "generate",
            "--threads",
            "1",
            "--prompt",
            "And it came to pass",
            "-n",
            "24",
        ])
        .args(["--temp", "1", "--model"])
        .arg(model())
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn printed_seed(stderr: &str) -> String {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("seed "))
        .and_then(|l| l.split(' ').next())
        .unwrap_or_else(|| panic!("no seed printed: {stderr}"))
        .to_string()
}

#[test]
fn generate_without_seed_draws_one_and_prints_it() {
    let (text, err) = generate(&[]);
    let seed = printed_seed(&err);
    let (_, err2) = generate(&[]);
    assert_ne!(seed, printed_seed(&err2), "two runs drew the same seed");
    let (again, err3) = generate(&["--seed", &seed]);
    assert_eq!(again, text, "--seed {seed} does not repeat the run");
    assert!(!err3.contains("seed "), "a given seed need not be printed");
}

#[test]
fn a_closed_stdout_ends_generate_quietly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgemoe"))
        .args([
            "generate",
            "--threads",
            "1",
            "--prompt",
            "And",
            "-n",
            "400",
            "--temp",
            "1",
        ])
        .arg("--model")
        .arg(model())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 8];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    // The reader is dropped here, as `head -c 8` would.
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("error") && !err.contains("panicked"), "{err}");
}

/// Without `--model` a fresh clone runs the trained model: readable text, no control bytes, the
/// same as naming it (`builtin:trained`, the copy embedded in the binary as bf16; it samples
/// other text than the f32 fixture directory, see tests/install.rs).
#[test]
fn the_default_model_prints_readable_text() {
    let run = |model: Option<PathBuf>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgemoe"));
        cmd.args([
            "generate",
            "--threads",
            "1",
            "--prompt",
            "And God said",
            "-n",
            "30",
            "--seed",
            "1",
            "--temp",
            "0.7",
        ]);
        if let Some(m) = model {
            cmd.arg("--model").arg(m);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let (text, err) = run(None);
    assert!(err.contains("builtin:trained"), "{err}");
    assert!(text.trim().len() > 20, "{text:?}");
    assert!(
        text.chars().all(|c| !c.is_control() || c == '\n'),
        "{text:?}"
    );
    assert_eq!(text, run(Some(PathBuf::from("builtin:trained"))).0);
}

/// The penalties reach the sampler: greedy decoding of the trained model repeats "the LORD",
/// a repetition or presence penalty changes the text, and out-of-range values are refused.
#[test]
fn penalties_change_greedy_text_and_are_range_checked() {
    let greedy = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_edgemoe"))
            .args([
                "generate",
                "--threads",
                "1",
                "--prompt",
                "In the beginning",
                "-n",
                "30",
            ])
            .arg("--model")
            .arg(model())
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (_, plain, _) = greedy(&[]);
    assert!(plain.matches("LORD").count() >= 2, "{plain}");
    for flag in [
        ["--repetition-penalty", "1.5"],
        ["--presence-penalty", "1.5"],
        ["--frequency-penalty", "1"],
    ] {
        let (ok, text, err) = greedy(&flag);
        assert!(ok, "{err}");
        assert_ne!(text, plain, "{flag:?} changed nothing");
    }
    let (ok, _, err) = greedy(&["--frequency-penalty", "-2.5"]);
    assert!(
        !ok && err.contains("--frequency-penalty must be in [-2, 2]"),
        "{err}"
    );
}

/// A negative number is an option's value: out of range, not an unknown argument.
#[test]
fn negative_numbers_are_values() {
    for (args, want) in [
        (
            &["generate", "--prompt", "x", "--temp", "-1"][..],
            "--temp must be",
        ),
        (
            &["generate", "--prompt", "x", "-n", "-5"][..],
            "invalid value '-5' for '--max-tokens",
        ),
        (
            &["serve", "--max-batch", "-1"][..],
            "invalid value '-1' for '--max-batch",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_edgemoe"))
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
        assert!(!err.contains("unexpected argument"), "{err}");
    }
}

/// `synth-moe` accepted `--hidden 64` (0 attention heads) and `--hidden 1152` (9 heads over 2
/// KV heads) and wrote .emoe files that every reader then refused, and `--skew nan` wrote NaN
/// routers; each width it accepts must now give a file that generates, and a config it cannot
/// make is refused before any work.
#[test]
fn synth_moe_writes_only_files_it_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_edgemoe");
    for hidden in ["64", "1152"] {
        let out = dir.path().join(format!("h{hidden}.emoe"));
        let made = Command::new(bin)
            .args([
                "synth-moe",
                "--layers",
                "1",
                "--ffn",
                "64",
                "--experts",
                "2",
            ])
            .args(["--hidden", hidden, "--out"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
        let run = Command::new(bin)
            .args([
                "generate",
                "--threads",
                "1",
                "--prompt",
                "hi",
                "-n",
                "2",
                "--model",
            ])
            .arg(&out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "--hidden {hidden}: {stderr}");
    }
    let out = dir.path().join("none.emoe");
    let refused = Command::new(bin)
        .args(["synth-moe", "--layers", "0", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("num_hidden_layers"),
        "{stderr}"
    );
    assert!(!out.exists());
    for (flag, value) in [("--skew", "nan"), ("--corr", "5"), ("--spread", "inf")] {
        let refused = Command::new(bin)
            .args([
                "synth-moe",
                "--layers",
                "1",
                "--ffn",
                "64",
                "--hidden",
                "128",
            ])
            .args([flag, value, "--out"])
            .arg(&out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success() && stderr.contains(flag),
            "{flag}: {stderr}"
        );
        assert!(!out.exists());
    }
}

/// `bench --json` names the kernel tier of every CPU kernel family, and `EDGEMOE_CPU=scalar`
/// puts every one of them on its portable path (the int8, int4, half and head families have
/// their own tier variables, which it caps too).
#[test]
fn bench_names_kernel_tiers_and_cpu_scalar_caps_them_all() {
    let tiers = |env: Option<(&str, &str)>| -> serde_json::Value {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgemoe"));
        cmd.args(["bench", "--model"])
            .arg(model())
            .args(["-p", "2", "-n", "2", "-r", "1", "--threads", "1", "--json"])
            .env_remove("EDGEMOE_CPU")
            .env_remove("EDGEMOE_INT8_TIER")
            .env_remove("EDGEMOE_HALF_TIER");
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run edgemoe bench");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        doc["cpu_kernels"].clone()
    };
    let families = ["f32", "int8", "int4", "half", "int8_head"];
    let native = tiers(None);
    for f in families {
        assert!(native[f].is_string(), "{f} in {native}");
    }
    let scalar = tiers(Some(("EDGEMOE_CPU", "scalar")));
    for f in families {
        assert_eq!(
            scalar[f], "scalar",
            "{f} under EDGEMOE_CPU=scalar: {scalar}"
        );
    }
}

/// `bench --membw` prints the measured read bandwidth and, per decode row, the tokens/s it
/// allows for the row's bytes per token: checked by redoing the arithmetic from the printed
/// figures (bound × MB/token = bandwidth, share = measured / bound).
#[test]
fn bench_membw_prints_a_consistent_roofline() {
    let out = Command::new(env!("CARGO_BIN_EXE_edgemoe"))
        .args(["bench", "--model"])
        .arg(model())
        .args(["-p", "4", "-n", "4", "-r", "1", "--threads", "1", "--membw"])
        .output()
        .expect("run edgemoe bench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let number_after = |line: &str, key: &str| -> f64 {
        let rest = &line[line
            .find(key)
            .unwrap_or_else(|| panic!("{key:?} in {line:?}"))
            + key.len()..];
        let digits: String = rest
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        digits
            .parse()
            .unwrap_or_else(|_| panic!("a number after {key:?} in {line:?}"))
    };
    let bw_line = text
        .lines()
        .find(|l| l.starts_with("memory read bandwidth:"))
        .unwrap_or_else(|| panic!("no bandwidth line in {text}"));
    let gbs = number_after(bw_line, "bandwidth:");
    assert!(gbs > 0.0 && bw_line.ends_with("(1 threads)"), "{bw_line}");
    let row = text
        .lines()
        .find(|l| l.starts_with("tg4@pp4:"))
        .unwrap_or_else(|| panic!("no roofline row in {text}"));
    let (mb, bound) = (
        number_after(row, "tg4@pp4:"),
        number_after(row, "decode at"),
    );
    let (measured, share) = (number_after(row, "measured"), number_after(row, "("));
    assert!(mb > 0.0, "{row}");
    // Printed with one decimal: allow for that rounding.
    assert!(
        (mb * bound / 1e3 - gbs).abs() <= 0.06 * bound / 1e3 + 0.05 * mb / 1e3 + 0.05,
        "{row} vs {gbs} GB/s"
    );
    assert!((100.0 * measured / bound - share).abs() <= 1.0, "{row}");
}
