//! `edgemoe quantize`: calibrate, smooth, GPTQ, and write an .emoe store. Progress on stderr,
//! the summary on stdout.

use crate::quant::{self, Method, QuantOptions};
use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct QuantizeArgs {
    /// Checkpoint directory (or builtin:NAME).
    #[arg(long)]
    pub model: PathBuf,
    /// Calibration text (UTF-8); not needed for --method rtn.
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// The .emoe file to write (its directory must exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Quantization method (haq: SmoothQuant + GPTQ).
    #[arg(long, value_enum, default_value = "haq")]
    pub method: Method,
    /// SmoothQuant α in [0, 1], or `auto` (the default) to search it per layer group by the
    /// W8A8 output error on the calibration rows.
    #[arg(long)]
    pub alpha: Option<String>,
    /// Calibration tokens to use at most.
    #[arg(long = "calib-tokens", default_value_t = 16384)]
    pub calib_tokens: usize,
    /// Calibration window length.
    #[arg(long, default_value_t = 256)]
    pub ctx: usize,
    /// GPTQ: quantize columns in order of decreasing Hessian diagonal.
    #[arg(long = "act-order")]
    pub act_order: bool,
    /// GPTQ: damping added to the Hessian's diagonal, as a share of its mean (larger leans
    /// toward plain rounding: less fitted to the calibration text).
    #[arg(long, default_value_t = crate::quant::DEFAULT_DAMP)]
    pub damp: f64,
    /// The output head (and embeddings tied to it): `weight-only` (int8 weights, f32
    /// activations: the default, since quantizing its input per token measured +0.5% ppl on
    /// SmolLM2-135M, see docs/BENCHMARKS.md), `w8a8` like the other linears, or `f32`.
    #[arg(long, value_enum, default_value = "weight-only")]
    pub head: quant::HeadQuant,
    /// Round the head (and embeddings tied to it) to nearest, row by row, instead of by GPTQ
    /// on the head's input (gptq and haq; docs/quantization.md).
    #[arg(long = "head-rtn")]
    pub head_rtn: bool,
    /// GPTQ damping of the head alone (default: --damp). A tied table is also the embeddings,
    /// which GPTQ does not weigh: more damping leans toward plain rounding.
    #[arg(long = "head-damp")]
    pub head_damp: Option<f64>,
    /// Also smooth o_proj / w2 / fc2 inputs, through a per-channel input scale the int8
    /// kernel applies (off by default: it measured no better; docs/quantization.md).
    #[arg(long = "smooth-unnormed")]
    pub smooth_unnormed: bool,
    /// Do not smooth the down-projections' inputs by folding 1/s into the up-projections (on by
    /// default for gated MLPs: exact, no run-time cost).
    #[arg(long = "no-fold-down")]
    pub no_fold_down: bool,
    /// Do not smooth o_proj's input by folding 1/s into v_proj's output channels (on by
    /// default: exact, no run-time cost).
    #[arg(long = "no-fold-vo")]
    pub no_fold_vo: bool,
    /// What calibrates the next layer: the outputs of the layer just quantized (GPTQ's
    /// sequential procedure, the default) or those of its f32 weights.
    #[arg(long, value_enum, default_value = "quantized")]
    pub propagate: quant::Propagate,
    /// Keep linears whose names contain NAME in f32 (repeatable; e.g. `layers.0.` or
    /// `down_proj`): mixed precision where a model is sensitive.
    #[arg(long = "keep-f32", value_name = "NAME")]
    pub keep_f32: Vec<String>,
    /// Do not rotate the residual stream and the down-projections' input before quantizing
    /// (by default pre-norm RMSNorm models with gated MLPs are rotated: exact in f32, it
    /// spreads activation outliers over all channels).
    #[arg(long = "no-rotate")]
    pub no_rotate: bool,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Weight bits of the routed experts: 8 (W8A8) or 4 (W4A8: int4 weights with per-group
    /// scales, int8 activations; half the bytes paged and read). Attention, shared experts
    /// and dense MLPs stay 8 unless named with --int4.
    #[arg(long, default_value_t = 8)]
    pub bits: u8,
    /// --bits 4: input columns per scale (32, 64 or 128).
    #[arg(long = "group-size", default_value_t = DEFAULT_GROUP)]
    pub group_size: usize,
    /// --bits 4: a zero point per group (asymmetric grid) instead of the symmetric one.
    #[arg(long)]
    pub asymmetric: bool,
    /// --bits 4: keep routed-expert linears whose names contain NAME at 8 bits (repeatable;
    /// e.g. `layers.0.` or `.w2`).
    #[arg(long = "keep-int8", value_name = "NAME")]
    pub keep_int8: Vec<String>,
    /// --bits 4: also give 4-bit weights to other linears whose names contain NAME
    /// (repeatable; e.g. `self_attn`).
    #[arg(long = "int4", value_name = "NAME")]
    pub int4_also: Vec<String>,
    /// --bits 4: how GPTQ picks each group's clipped range: by GPTQ's own cost on the
    /// input's Hessian (`gptq`) or by the group's squared rounding error (`mse`).
    #[arg(long = "group-rule", value_enum, default_value = "gptq")]
    pub group_rule: quant::gptq4::GroupRule,
    /// --bits 4: refit each row's group scales by least squares on the input's Hessian once
    /// GPTQ has fixed the codes (`true` or `false`).
    #[arg(long = "scale-refit", value_parser = clap::builder::BoolishValueParser::new(),
          action = clap::ArgAction::Set, default_value = "true")]
    pub scale_refit: bool,
}

/// The default int4 group size (docs/quantization.md has the measurement behind it).
pub const DEFAULT_GROUP: usize = 64;

/// The int4 options `--bits 4` asks for; the int4-only flags without it are refused.
fn int4_options(a: &QuantizeArgs) -> anyhow::Result<Option<quant::Int4Options>> {
    anyhow::ensure!(
        matches!(a.bits, 4 | 8),
        "--bits must be 8 or 4, got {}",
        a.bits
    );
    if a.bits != 4 {
        let stray = [
            (a.group_size != DEFAULT_GROUP, "--group-size"),
            (a.asymmetric, "--asymmetric"),
            (!a.keep_int8.is_empty(), "--keep-int8"),
            (!a.int4_also.is_empty(), "--int4"),
            (
                a.group_rule != quant::gptq4::GroupRule::Gptq,
                "--group-rule",
            ),
            (!a.scale_refit, "--scale-refit"),
        ];
        if let Some((_, flag)) = stray.iter().find(|(set, _)| *set) {
            anyhow::bail!("{flag} applies to 4-bit weights: add --bits 4");
        }
        return Ok(None);
    }
    anyhow::ensure!(
        crate::model::int4::GROUP_SIZES.contains(&a.group_size),
        "--group-size must be one of {:?}, got {}",
        crate::model::int4::GROUP_SIZES,
        a.group_size
    );
    Ok(Some(quant::Int4Options {
        grid: quant::gptq4::Int4Grid {
            group: a.group_size,
            symmetric: !a.asymmetric,
        },
        keep_int8: a.keep_int8.clone(),
        also: a.int4_also.clone(),
    }))
}

/// Refuses inputs quantizing cannot use and outputs it cannot write, before any work.
fn check_paths(a: &QuantizeArgs) -> anyhow::Result<()> {
    let starts_with_magic = |path: &std::path::Path| {
        use std::io::Read;
        let mut magic = [0u8; 8];
        std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok_and(|_| magic == crate::model::emoe::MAGIC)
    };
    let is_emoe = a.model.is_file() && starts_with_magic(&a.model);
    anyhow::ensure!(
        !is_emoe,
        "{} is already quantized (an .emoe); quantize takes a checkpoint directory, a .gguf file or builtin:NAME",
        a.model.display()
    );
    anyhow::ensure!(
        !a.out.is_dir(),
        "--out {} is a directory; give the path of the .emoe file to write",
        a.out.display()
    );
    let parent = super::output_dir(&a.out);
    anyhow::ensure!(
        parent.is_dir(),
        "--out {}: the directory {} does not exist",
        a.out.display(),
        parent.display()
    );
    Ok(())
}

pub fn run(a: QuantizeArgs) -> anyhow::Result<()> {
    check_paths(&a)?;
    // Read a layer at a time from the file: only the layer being quantized is held in f32.
    let model = match a.model.to_str().and_then(|s| s.strip_prefix("builtin:")) {
        Some(_) => crate::load_model(Some(&a.model))?,
        None => crate::model::Model::load_in_place(&a.model)?,
    };
    // The checkpoint's chat template travels with the store, so `serve` renders chats from it
    // (read before the long part, which a bad tokenizer_config.json must not waste).
    let template = match a.model.to_str().and_then(|s| s.strip_prefix("builtin:")) {
        Some(_) => None,
        None => crate::serve::chat::ChatTemplate::source_for_model(&a.model)?,
    };
    let mut opts = QuantOptions::new(a.method, &model);
    opts.act_order = a.act_order;
    if !(a.damp.is_finite() && a.damp > 0.0 && a.damp <= 10.0) {
        anyhow::bail!("--damp must be in (0, 10], got {}", a.damp);
    }
    opts.damp = a.damp;
    opts.head = a.head;
    opts.head_gptq = !a.head_rtn;
    if let Some(d) = a.head_damp {
        if !(d.is_finite() && d > 0.0 && d <= 10.0) {
            anyhow::bail!("--head-damp must be in (0, 10], got {d}");
        }
        opts.head_damp = Some(d);
    }
    opts.smooth_unnormed = a.smooth_unnormed;
    opts.fold_down = !a.no_fold_down;
    opts.fold_vo = !a.no_fold_vo;
    opts.threads = a.threads;
    opts.propagate = a.propagate;
    opts.keep_f32 = a.keep_f32.clone();
    opts.rotate = !a.no_rotate;
    opts.int4 = int4_options(&a)?;
    opts.int4_rule = a.group_rule;
    opts.int4_refit = a.scale_refit;
    // Finished layers wait beside the output, on its disk, not in memory.
    opts.spill_dir = Some(super::output_dir(&a.out).to_path_buf());
    match a.alpha.as_deref() {
        None => {}
        Some("auto") => opts.alpha = None,
        Some(v) => {
            let alpha: f32 = v.parse().map_err(|_| {
                anyhow::anyhow!("--alpha must be a number in [0, 1] or `auto`, got {v:?}")
            })?;
            anyhow::ensure!(
                (0.0..=1.0).contains(&alpha),
                "--alpha must be in [0, 1], got {alpha}"
            );
            opts.alpha = Some(alpha);
        }
    }
    let calib = match (&a.calib, a.method) {
        // Else the truncation below blames the text ("too little calibration text").
        (Some(_), _) if a.calib_tokens < 2 => {
            anyhow::bail!("--calib-tokens must be at least 2, got {}", a.calib_tokens)
        }
        (Some(path), _) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
            let mut t = model.tokenizer.encode(&text, false)?;
            t.truncate(a.calib_tokens);
            anyhow::ensure!(
                t.len() >= 2,
                "{}: too little calibration text",
                path.display()
            );
            t
        }
        (None, Method::Rtn) => vec![],
        (None, m) => anyhow::bail!("--method {m:?} needs --calib FILE (calibration text)"),
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {elapsed}, ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = std::time::Instant::now();
    let (model, summary) = quant::quantize(model, &calib, a.ctx, &opts, |stage, done, total| {
        bar.set_message(stage.to_string());
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    let mut recorded = summary.clone();
    if opts.alpha.is_some() {
        recorded.alphas.clear(); // all equal to the fixed α in the options
    }
    let meta = serde_json::json!({"method": a.method, "options": opts, "summary": recorded});
    let written = quant::store::write_emoe_with_template(&model, meta, &a.out, template)?;
    println!(
        "quantized {} with {} in {:.1} s → {} ({:.1} MB)",
        a.model.display(),
        // The name the user typed (`haq`), not the Rust variant.
        clap::ValueEnum::to_possible_value(&a.method)
            .map_or("?".into(), |v| v.get_name().to_string()),
        started.elapsed().as_secs_f64(),
        a.out.display(),
        written.total_bytes as f64 / 1e6
    );
    println!(
        "  {} quantized linears ({} int8, {} int4; {:.2} M params), {} by GPTQ, {} calibration tokens",
        summary.linears,
        summary.linears - summary.int4_linears,
        summary.int4_linears,
        summary.params as f64 / 1e6,
        summary.gptq,
        summary.calib_tokens
    );
    let phases: Vec<String> = summary
        .phase_seconds
        .iter()
        .map(|(p, t)| format!("{p} {t:.1} s"))
        .collect();
    println!("  time: {}", phases.join(", "));
    if let Some(peak) = summary.peak_rss_bytes {
        println!("  peak RSS {:.1} MiB", peak as f64 / (1 << 20) as f64);
    }
    if let Some(r) = &summary.rotation {
        println!("  rotation: {r}");
    }
    if !summary.rtn_fallback.is_empty() {
        println!(
            "  too few calibration tokens, rounded instead ({}): {}",
            summary.rtn_fallback.len(),
            summary.rtn_fallback.join(", ")
        );
    }
    if opts.alpha.is_none() && !summary.alphas.is_empty() {
        // How often each α was chosen (the .emoe's metadata keeps the choice per group).
        let mut counts = std::collections::BTreeMap::new();
        for (_, alpha) in &summary.alphas {
            *counts.entry(format!("{alpha:.1}")).or_insert(0usize) += 1;
        }
        let counts: Vec<String> = counts.iter().map(|(a, n)| format!("{a} ×{n}")).collect();
        println!(
            "  alpha chosen per group ({}): {}",
            summary.alphas.len(),
            counts.join(", ")
        );
    }
    Ok(())
}
