//! The tensor table against the embedded config: a model is built from an .emoe only when the
//! file holds exactly the tensors the config implies (each with the shape and dtype the loader
//! asks for), and each expert's tensors lie in that expert's block.
//!
//! The loader is the one statement of what a config implies, so rather than restate it, the
//! file is read through [`Recording`], which notes every tensor and block the loader takes;
//! what the table holds beyond that is an error, as is whatever the loader could not find.

use super::reader::EmoeFile;
use crate::error::{Error, Result};
use crate::model::arch;
use crate::model::config::ModelConfig;
use crate::model::weights::{Ffn, Stored, StoredBlock, TensorSource, WeightForm, Weights};
use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::Arc;

/// An [`EmoeFile`] that remembers what was asked of it.
struct Recording<'a> {
    file: &'a EmoeFile,
    used: RefCell<HashSet<String>>,
}

impl TensorSource for Recording<'_> {
    fn has(&self, name: &str) -> bool {
        let found = TensorSource::has(self.file, name);
        if found {
            // Markers (`P.weight_only`) are only ever tested for.
            self.used.borrow_mut().insert(name.to_string());
        }
        found
    }

    fn stored(&self, name: &str, shape: &[usize], why: &str) -> Result<Stored> {
        let s = self.file.stored(name, shape, why)?;
        self.used.borrow_mut().insert(name.to_string());
        Ok(s)
    }

    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.file.shape_of(name)
    }

    fn expert_block(&self, layer: usize, expert: usize) -> Option<Arc<StoredBlock>> {
        self.file.expert_block(layer, expert)
    }
}

/// The model's weights from `file`, whose table must be exactly what `config` implies.
pub fn load_checked(file: &EmoeFile, config: &ModelConfig) -> Result<Weights> {
    let rec = Recording {
        file,
        used: RefCell::new(HashSet::new()),
    };
    let disagree = |detail: String| {
        Error::Emoe {
        path: file.path().to_path_buf(),
        reason: format!(
            "the tensor table does not match the embedded config ({}, {} layers, hidden_size {}): {detail}",
            config.arch.hf_name(),
            config.num_layers,
            config.hidden_size
        ),
    }
    };
    let weights = arch::load_weights(config, &rec, WeightForm::AsStored).map_err(|e| match e {
        // Corruption found while reading keeps its own message.
        Error::Emoe { .. } | Error::Io { .. } => e,
        other => disagree(other.to_string()),
    })?;
    let used = rec.used.into_inner();
    let header = file.header();
    if let Some(t) = header.tensors.iter().find(|t| !used.contains(&t.name)) {
        return Err(disagree(format!(
            "tensor `{}` is not part of the model the config describes",
            t.name
        )));
    }
    for t in header
        .tensors
        .iter()
        .filter(|t| t.name.ends_with(".weight_only"))
    {
        if t.dtype != super::EmoeDtype::I8 || t.shape != [1] {
            return Err(disagree(format!(
                "marker tensor `{}` is {:?} {:?}, expected I8 [1]",
                t.name, t.dtype, t.shape
            )));
        }
    }
    check_blocks(file, &weights, &used).map_err(disagree)?;
    Ok(weights)
}

/// Every routed expert has its block, holding exactly that expert's tensors; no other blocks.
fn check_blocks(
    file: &EmoeFile,
    weights: &Weights,
    used: &HashSet<String>,
) -> std::result::Result<(), String> {
    let header = file.header();
    let mut expected_blocks = 0;
    for (li, layer) in weights.layers.iter().enumerate() {
        let Ffn::Moe(moe) = &layer.ffn else { continue };
        for (e, mlp) in moe.experts.iter().enumerate() {
            let what = format!("expert block (layer {li}, expert {e})");
            let b = header
                .block_index(li, e)
                .and_then(|i| header.blocks.get(i))
                .ok_or_else(|| format!("{what} is missing"))?;
            expected_blocks += 1;
            let prefixes = [&mlp.gate, &mlp.up, &mlp.down].map(|l| format!("{}.", l.name));
            let mine = |n: &str| prefixes.iter().any(|p| n.starts_with(p.as_str()));
            let want: HashSet<&str> = used
                .iter()
                .map(String::as_str)
                .filter(|n| mine(n))
                .collect();
            let have: HashSet<&str> = b.tensors.iter().map(String::as_str).collect();
            if let Some(n) = want.difference(&have).next() {
                return Err(format!("tensor `{n}` is not inside its {what}"));
            }
            if let Some(n) = have.difference(&want).next() {
                return Err(format!(
                    "{what} holds tensor `{n}`, which is not that expert's"
                ));
            }
        }
    }
    if header.blocks.len() != expected_blocks {
        // Every expected block was found, so the rest name experts the model does not route to.
        let extra = header
            .blocks
            .iter()
            .find(|b| {
                !matches!(weights.layers.get(b.layer).map(|l| &l.ffn), Some(Ffn::Moe(m)) if b.expert < m.experts.len())
            })
            .map(|b| format!("expert block (layer {}, expert {})", b.layer, b.expert))
            .unwrap_or_else(|| "an expert block".into());
        return Err(format!(
            "{extra} belongs to no routed expert of the model the config describes"
        ));
    }
    Ok(())
}
