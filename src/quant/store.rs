//! Writes a (quantized) model to an .emoe store under the checkpoint's own tensor names, so the
//! architecture loaders read it back unchanged: `P.weight` for f32 linears, `P.qweight` (int8),
//! `P.scales`, `P.row_sums` and `P.input_scale` for quantized ones. Each expert's tensors form one block.

use crate::error::{Error, Result};
use crate::model::emoe::{EmoeDtype, EmoeWriter, TensorData, WriteSummary};
use crate::model::int4::TILE_ROWS;
use crate::model::tokenizer::Tokenizer;
use crate::model::weights::{Ffn, Linear, LinearWeight, Norm};
use crate::model::Model;
use std::path::Path;

/// f32 values written from where the model holds them (no copy).
fn f32_tensor(name: String, shape: Vec<usize>, values: &[f32]) -> TensorData<'_> {
    TensorData::borrowed(name, EmoeDtype::F32, shape, values)
}

fn linear_tensors(lin: &Linear) -> Vec<TensorData<'_>> {
    let (n, k, p) = (lin.out_features, lin.in_features, &lin.name);
    let mut out = match &lin.weight {
        LinearWeight::F32Rows(rows) => vec![TensorData::borrowed(
            format!("{p}.weight"),
            EmoeDtype::F32,
            vec![n, k],
            &rows[..],
        )],
        LinearWeight::Prepared(_) | LinearWeight::Half(..) => {
            let rows = lin.f32_rows().unwrap_or_default();
            vec![TensorData::from_f32(
                format!("{p}.weight"),
                vec![n, k],
                &rows,
            )]
        }
        LinearWeight::Int8(m) | LinearWeight::Int8WeightOnly(m) => {
            let marker = matches!(lin.weight, LinearWeight::Int8WeightOnly(_)).then(|| {
                TensorData::borrowed(format!("{p}.weight_only"), EmoeDtype::I8, vec![1], &[1i8])
            });
            // The kernels' own layout (padded rows, f32 scales, row sums): used in place.
            vec![
                TensorData::borrowed(
                    format!("{p}.qweight"),
                    EmoeDtype::I8,
                    vec![n, m.k_padded],
                    &m.data[..],
                ),
                f32_tensor(format!("{p}.scales"), vec![n], &m.scales),
                TensorData::borrowed(
                    format!("{p}.row_sums"),
                    EmoeDtype::I32,
                    vec![n],
                    &m.row_sums[..],
                ),
            ]
            .into_iter()
            .chain(marker)
            .collect()
        }
        LinearWeight::Int4(m) => {
            let (tiles, groups) = (m.n_tiles(), m.groups());
            // The kernels' tiled layout, used in place; the group size is in the shape.
            let mut v = vec![
                TensorData::borrowed(
                    format!("{p}.qweight4"),
                    EmoeDtype::U8,
                    vec![tiles * TILE_ROWS, groups, m.group / 2],
                    &m.data[..],
                ),
                TensorData::borrowed(
                    format!("{p}.scales4"),
                    EmoeDtype::F16,
                    vec![tiles, groups, TILE_ROWS],
                    &m.scales[..],
                ),
            ];
            if let Some(z) = &m.zeros {
                v.push(TensorData::borrowed(
                    format!("{p}.zeros4"),
                    EmoeDtype::U8,
                    vec![tiles, groups, TILE_ROWS],
                    &z[..],
                ));
            }
            v
        }
    };
    if let Some(b) = &lin.bias {
        out.push(f32_tensor(format!("{p}.bias"), vec![n], b));
    }
    if let Some(s) = &lin.input_scale {
        out.push(f32_tensor(format!("{p}.input_scale"), vec![k], s));
    }
    out
}

fn norm_tensors(norm: &Norm) -> Vec<TensorData<'_>> {
    match norm {
        Norm::Rms { name, weight, .. } => {
            vec![f32_tensor(
                format!("{name}.weight"),
                vec![weight.len()],
                weight,
            )]
        }
        Norm::Layer {
            name, weight, bias, ..
        } => vec![
            f32_tensor(format!("{name}.weight"), vec![weight.len()], weight),
            f32_tensor(format!("{name}.bias"), vec![bias.len()], bias),
        ],
    }
}

pub fn write_emoe(model: &Model, quant: serde_json::Value, path: &Path) -> Result<WriteSummary> {
    write_emoe_with_template(model, quant, path, None)
}

/// [`write_emoe`], keeping `chat_template` (the source model's) in the header.
pub fn write_emoe_with_template<'a>(
    model: &'a Model,
    quant: serde_json::Value,
    path: &Path,
    chat_template: Option<String>,
) -> Result<WriteSummary> {
    let tokenizer_json = match &model.tokenizer {
        Tokenizer::Hf(t) => t
            .to_string(false)
            .map_err(|e| Error::invalid(format!("cannot serialize the tokenizer: {e}")))?,
        // Empty means the built-in byte-level tokenizer.
        Tokenizer::Bytes => String::new(),
    };
    let mut w = EmoeWriter::new(&model.config, tokenizer_json, quant);
    w.set_chat_template(chat_template);
    let weights = &model.weights;
    let mut add = |ts: Vec<TensorData<'a>>| ts.into_iter().for_each(|t| w.add_tensor(t));
    add(linear_tensors(&weights.embed));
    if let Some(p) = &weights.positions {
        // OPT: the table sits beside the token embeddings (`…embed_tokens` → `…embed_positions`).
        let root = weights.embed.name.trim_end_matches("embed_tokens");
        add(vec![f32_tensor(
            format!("{root}embed_positions.weight"),
            vec![p.len() / model.config.hidden_size, model.config.hidden_size],
            p,
        )]);
    }
    for lin in [
        &weights.project_in,
        &weights.head_transform,
        &weights.project_out,
        &weights.lm_head,
    ]
    .into_iter()
    .flatten()
    {
        add(linear_tensors(lin));
    }
    if let Some(n) = &weights.final_norm {
        add(norm_tensors(n));
    }
    let mut blocks = Vec::new();
    for (li, layer) in weights.layers.iter().enumerate() {
        add(norm_tensors(&layer.attn_norm));
        add(norm_tensors(&layer.ffn_norm));
        let a = &layer.attn;
        for lin in a.projections() {
            add(linear_tensors(lin));
        }
        for n in a.norms() {
            add(norm_tensors(n));
        }
        if let Some(sinks) = &a.sinks {
            // Beside the projections, as the checkpoint names it (`…self_attn.sinks`).
            let root = a.q.name.trim_end_matches("q_proj");
            add(vec![f32_tensor(
                format!("{root}sinks"),
                vec![sinks.len()],
                sinks,
            )]);
        }
        match &layer.ffn {
            Ffn::Moe(b) => {
                add(linear_tensors(&b.router));
                if let Some(bias) = &b.score_bias {
                    let name = format!("{}.e_score_correction_bias", b.router.name);
                    add(vec![f32_tensor(name, vec![bias.len()], bias)]);
                }
                if let Some(s) = &b.shared {
                    let gate = s.gate.iter();
                    for lin in [&s.mlp.gate, &s.mlp.up, &s.mlp.down]
                        .into_iter()
                        .chain(gate)
                    {
                        add(linear_tensors(lin));
                    }
                }
                for (e, ex) in b.experts.iter().enumerate() {
                    let tensors = [&ex.gate, &ex.up, &ex.down]
                        .into_iter()
                        .flat_map(linear_tensors)
                        .collect();
                    blocks.push((li, e, tensors));
                }
            }
            Ffn::Gated(m) => [&m.gate, &m.up, &m.down]
                .into_iter()
                .for_each(|l| add(linear_tensors(l))),
            Ffn::Plain(m) => [&m.fc1, &m.fc2]
                .into_iter()
                .for_each(|l| add(linear_tensors(l))),
        }
    }
    for (li, e, tensors) in blocks {
        w.add_expert_block(li, e, tensors);
    }
    w.write(path)
}
