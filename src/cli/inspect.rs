//! `edgemoe inspect MODEL.emoe [--json] [--verify]`: the header, bytes per tensor class and the
//! expert-block layout of an .emoe file, as tables or as one JSON object.

use crate::model::emoe::{ClassStats, EmoeFile, TensorClass};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct InspectArgs {
    /// The .emoe file.
    pub model: PathBuf,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Also verify every expert block's checksum (reads the whole file).
    #[arg(long)]
    pub verify: bool,
}

pub fn run(a: InspectArgs) -> anyhow::Result<()> {
    let file = EmoeFile::open(&a.model)?;
    if a.verify {
        file.verify_all()?;
    }
    let text = if a.json {
        let mut v = render_json(&file);
        v["checksums_verified"] = json!(a.verify);
        format!("{v}\n")
    } else {
        render_text(&file, a.verify)
    };
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(())
}

/// The quantization method (`quant.method`) and the remaining parameters.
fn quant_parts(quant: &Value) -> (String, Value) {
    match quant {
        Value::Object(m) => {
            let method = m
                .get("method")
                .and_then(Value::as_str)
                .unwrap_or("(unnamed)");
            // Filtered, not `remove`d: that would reorder the parameters.
            let params = m.iter().filter(|(k, _)| *k != "method");
            let params = params.map(|(k, v)| (k.clone(), v.clone())).collect();
            (method.to_string(), Value::Object(params))
        }
        Value::Null => ("none".to_string(), Value::Null),
        other => ("(unnamed)".to_string(), other.clone()),
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

pub fn render_text(f: &EmoeFile, verified: bool) -> String {
    let h = f.header();
    let c = &h.config;
    let (method, params) = quant_parts(&h.quant);
    let mut s = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        s,
        "file        {}  ({} bytes, {:.2} MiB)",
        f.path().display(),
        h.file_len,
        mib(h.file_len)
    );
    let _ = writeln!(
        s,
        "format      .emoe version {}, header {} bytes",
        h.version, h.header_len
    );
    let _ = writeln!(
        s,
        "model       {}: {} layers, hidden {}, {} heads ({} kv, head_dim {}), vocab {}",
        c.arch.hf_name(),
        c.num_layers,
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.vocab_size
    );
    let shared = c
        .shared_expert_ffn
        .map_or("none".to_string(), |n| n.to_string());
    let _ = writeln!(
        s,
        "experts     {} per MoE layer, top-{}, ffn {}, shared expert ffn {}",
        c.num_experts, c.top_k, c.expert_ffn, shared
    );
    let _ = writeln!(s, "quant       {method}  {params}");
    let _ = writeln!(s, "head        {}", head_layout(f));
    let _ = writeln!(
        s,
        "tokenizer   {} bytes of tokenizer.json",
        h.tokenizer_json.len()
    );
    let d = h.data;
    let _ = writeln!(
        s,
        "data        offset {}, {} bytes, crc32c {:#010x}",
        d.offset, d.len, d.crc32c
    );
    if verified {
        let _ = writeln!(
            s,
            "checksums   all {} expert blocks verified",
            h.blocks.len()
        );
    }

    let _ = writeln!(s, "\nbytes per tensor class");
    let _ = writeln!(
        s,
        "{:<14} {:>8} {:>14} {:>10} {:>14} {:>14} {:>12}",
        "class", "tensors", "bytes", "MiB", "int8 params", "int4 params", "bytes/param"
    );
    let tally = h.class_tally();
    let mut total = ClassStats::default();
    for (class, st) in &tally.0 {
        class_row(&mut s, class.label(), st, true);
        total.tensors += st.tensors;
        total.bytes += st.bytes;
        total.int8_params += st.int8_params;
        total.int4_params += st.int4_params;
    }
    // Bytes per int8 param means little summed over classes without int8 weights.
    class_row(&mut s, "total", &total, false);

    let _ = writeln!(s, "\nexpert blocks ({})", h.blocks.len());
    let _ = writeln!(
        s,
        "{:>5} {:>6} {:>14} {:>12} {:>10} {:>7}",
        "layer", "expert", "offset", "len", "crc32c", "tensors"
    );
    for b in &h.blocks {
        let _ = writeln!(
            s,
            "{:>5} {:>6} {:>14} {:>12} {:#010x} {:>7}",
            b.layer,
            b.expert,
            b.offset,
            b.len,
            b.crc32c,
            b.tensors.len()
        );
    }
    s
}

/// Whether the head has its own matrix or is the embedding table, and what it reads.
fn head_layout(f: &EmoeFile) -> String {
    let h = f.header();
    if !h.config.tie_word_embeddings {
        return "its own matrix (lm_head)".into();
    }
    let transform = h
        .tensors
        .iter()
        .find(|t| h.config.head_transform && t.name.ends_with(".transform.weight"));
    match transform {
        Some(t) => format!(
            "tied to the embedding table, reading the final norm through `{}` ({:?} {:?})",
            t.name, t.dtype, t.shape
        ),
        None => "tied to the embedding table".into(),
    }
}

fn class_row(s: &mut String, label: &str, st: &ClassStats, per_param: bool) {
    let per = st
        .bytes_per_quantized_param()
        .filter(|_| per_param)
        .map_or("-".to_string(), |b| format!("{b:.4}"));
    let _ = writeln!(
        s,
        "{:<14} {:>8} {:>14} {:>10.2} {:>14} {:>14} {:>12}",
        label,
        st.tensors,
        st.bytes,
        mib(st.bytes),
        st.int8_params,
        st.int4_params,
        per
    );
}

pub fn render_json(f: &EmoeFile) -> Value {
    let h = f.header();
    let (method, params) = quant_parts(&h.quant);
    let classes: Vec<Value> = h
        .class_tally()
        .0
        .iter()
        .map(|(class, st): (&TensorClass, &ClassStats)| {
            json!({
                "class": class,
                "tensors": st.tensors,
                "bytes": st.bytes,
                "int8_params": st.int8_params,
                "bytes_per_int8_param": st.bytes_per_int8_param(),
                "int4_params": st.int4_params,
                "bytes_per_quantized_param": st.bytes_per_quantized_param(),
            })
        })
        .collect();
    let blocks: Vec<Value> = h
        .blocks
        .iter()
        .map(|b| {
            json!({
                "layer": b.layer,
                "expert": b.expert,
                "offset": b.offset,
                "len": b.len,
                "crc32c": b.crc32c,
                "tensors": b.tensors,
            })
        })
        .collect();
    json!({
        "file": f.path().display().to_string(),
        "file_bytes": h.file_len,
        "version": h.version,
        "header_bytes": h.header_len,
        "config": h.config,
        "tokenizer_json_bytes": h.tokenizer_json.len(),
        "quant": { "method": method, "params": params },
        "data_region": h.data,
        "classes": classes,
        "expert_blocks": blocks,
    })
}
