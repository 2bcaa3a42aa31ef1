//! What an installed binary needs: the built-in trained model embedded in it (bf16), with logits
//! close to the f32 fixture's, generating readable text from a directory outside the source tree
//! without reading the fixture; and `--version`.

use edgemoe::engine::{BatchItem, Logits};
use edgemoe::{Engine, Model};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trained-moe")
}

/// Every position's logits for `tokens` in one prefill.
fn logits(model: Model, tokens: &[u32]) -> Vec<f32> {
    let engine = Engine::new(Arc::new(model), 2).unwrap();
    let mut cache = engine.new_cache_for(tokens.len());
    let mut batch = [BatchItem {
        tokens,
        cache: &mut cache,
        logits: Logits::All,
    }];
    engine.forward(&mut batch).unwrap().remove(0)
}

/// Log-softmax of one row of logits.
fn log_probs(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::MIN, f32::max) as f64;
    let log_z = row
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    row.iter().map(|&v| v as f64 - log_z).collect()
}

/// bf16 keeps 8 significant bits: each weight moves by at most 2^-9 of itself (0.2%), so a
/// typical logit moves by a small fraction of a percent of the logits' spread. A few positions
/// move more (a sparse model is not smooth: a router near a tie may pick another expert), so the
/// bounds are on the distribution, not the single worst logit: the 99th percentile of |diff|
/// under 1% of the logits' standard deviation, the next-token distributions' KL divergence
/// under 1e-3 nats on average and 0.05 at worst, and the same top token at 95% of positions.
/// (Measured at writing: 0.5%, 6e-5 and 0.013 nats, 256/256.)
#[test]
fn embedded_logits_match_the_f32_fixture() {
    let f32_model = Model::load(&fixture()).unwrap();
    let text = std::fs::read_to_string(fixture().join("heldout.txt")).unwrap();
    let mut tokens = f32_model.tokenizer.encode(&text, false).unwrap();
    tokens.truncate(256);
    let vocab = f32_model.config.vocab_size;
    let embedded = edgemoe::load_model(None).unwrap();
    assert_eq!(embedded.source, "builtin:trained");
    let want = logits(f32_model, &tokens);
    let got = logits(embedded, &tokens);
    assert_eq!(want.len(), got.len());
    let rows = tokens.len();

    let mean = want.iter().sum::<f32>() / want.len() as f32;
    let var = want.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / want.len() as f32;
    let std = var.sqrt();
    let mut diffs: Vec<f32> = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).collect();
    diffs.sort_by(f32::total_cmp);
    let p99 = diffs[(diffs.len() - 1) * 99 / 100];
    let max_diff = diffs[diffs.len() - 1];

    let (mut kl_sum, mut kl_max, mut same_top) = (0f64, 0f64, 0);
    for (a, b) in want.chunks(vocab).zip(got.chunks(vocab)) {
        let (la, lb) = (log_probs(a), log_probs(b));
        let kl: f64 = la.iter().zip(&lb).map(|(x, y)| x.exp() * (x - y)).sum();
        kl_sum += kl;
        kl_max = kl_max.max(kl);
        let argmax = |row: &[f32]| (0..row.len()).max_by(|&i, &j| row[i].total_cmp(&row[j]));
        same_top += usize::from(argmax(a) == argmax(b));
    }
    let kl_mean = kl_sum / rows as f64;
    eprintln!(
        "bf16 vs f32 over {rows} positions: |diff| p99 {p99:.4} ({:.2}% of the logit std {std:.3}), max {max_diff:.4}; KL mean {kl_mean:.2e} max {kl_max:.2e} nats; same top token {same_top}/{rows}",
        100.0 * p99 / std
    );
    assert!(p99 < 0.01 * std, "p99 |diff| {p99} vs std {std}");
    assert!(
        kl_mean < 1e-3 && kl_max < 0.05,
        "KL mean {kl_mean} max {kl_max}"
    );
    assert!(
        same_top * 100 >= rows * 95,
        "top token differs: {same_top}/{rows}"
    );
}

/// The installed-binary case: run from a directory outside the source tree; the binary holds no
/// path into that tree (so it cannot read the fixture) and still prints readable text.
#[test]
fn binary_generates_from_another_directory_without_the_source_tree() {
    let bin = env!("CARGO_BIN_EXE_edgemoe");
    let image = std::fs::read(bin).unwrap();
    let fixture_path = fixture().display().to_string();
    assert!(
        !image
            .windows(fixture_path.len())
            .any(|w| w == fixture_path.as_bytes()),
        "the binary names {fixture_path}"
    );
    let cwd = tempfile::tempdir().unwrap();
    let out = Command::new(bin)
        .current_dir(cwd.path())
        .args(["generate", "--prompt", "And God said", "-n", "30"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let generated = String::from_utf8(out.stdout).unwrap();
    eprintln!("And God said{generated}");
    // Readable: mostly letters and spaces, and words the King James Bible uses.
    let letters = generated
        .chars()
        .filter(|c| c.is_ascii_alphabetic() || *c == ' ')
        .count();
    assert!(letters * 10 >= generated.chars().count() * 8, "{generated}");
    let words = ["the", "and", "of", "unto", "that", "Lord"];
    assert!(
        generated
            .split(|c: char| !c.is_alphabetic())
            .filter(|w| words.contains(w))
            .count()
            >= 2,
        "{generated}"
    );
}

#[test]
fn version_prints_the_package_version() {
    for flag in ["--version", "-V"] {
        let out = Command::new(env!("CARGO_BIN_EXE_edgemoe"))
            .arg(flag)
            .output()
            .unwrap();
        assert!(out.status.success(), "{flag}");
        let want = format!("edgemoe {}\n", env!("CARGO_PKG_VERSION"));
        assert_eq!(String::from_utf8_lossy(&out.stdout), want, "{flag}");
    }
}
