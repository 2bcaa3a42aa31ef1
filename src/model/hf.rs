//! A Hugging Face checkpoint directory: config.json, model.safetensors or shards listed in
//! model.safetensors.index.json, tokenizer.json and an optional generation_config.json.

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::safetensors::SafetensorsFile;
use crate::model::weights::{Stored, TensorSource};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct HfCheckpoint {
    pub dir: PathBuf,
    /// Tensor name → the shard that holds it.
    tensors: HashMap<String, Arc<SafetensorsFile>>,
}

impl HfCheckpoint {
    pub fn open(dir: &Path) -> Result<HfCheckpoint> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut tensors = HashMap::new();
        if index.exists() {
            for (name, file) in read_index(&index)? {
                tensors.insert(name, file);
            }
        } else if single.exists() {
            return Ok(Self::single(dir, SafetensorsFile::open(&single)?));
        } else {
            return Err(Error::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors or model.safetensors.index.json in the checkpoint directory",
                ),
            ));
        }
        Ok(HfCheckpoint {
            dir: dir.to_path_buf(),
            tensors,
        })
    }

    /// A checkpoint whose tensors are all in one safetensors file, named `dir` in reports.
    pub fn single(dir: &Path, file: Arc<SafetensorsFile>) -> HfCheckpoint {
        let tensors = file
            .tensors()
            .keys()
            .map(|name| (name.clone(), file.clone()))
            .collect();
        HfCheckpoint {
            dir: dir.to_path_buf(),
            tensors,
        }
    }

    /// Reads config.json and applies generation_config.json (eos may be a list) when present.
    pub fn config(dir: &Path) -> Result<ModelConfig> {
        let path = dir.join("config.json");
        let mut cfg = ModelConfig::from_file(&path)?;
        let gen = dir.join("generation_config.json");
        if gen.exists() {
            let text = std::fs::read_to_string(&gen).map_err(|e| Error::io(&gen, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::config(&gen, "(file)", format!("not valid JSON: {e}")))?;
            cfg.apply_generation_config(&json);
        }
        Ok(cfg)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }
}

fn read_index(index: &Path) -> Result<Vec<(String, Arc<SafetensorsFile>)>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let bad = |reason: String| Error::Safetensors {
        path: index.to_path_buf(),
        reason,
    };
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("index is not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("index has no `weight_map` object".into()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shards: HashMap<String, Arc<SafetensorsFile>> = HashMap::new();
    let mut out = Vec::with_capacity(map.len());
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map entry for `{name}` is not a file name")))?;
        if file.contains('/') || file.contains("..") {
            return Err(bad(format!(
                "shard name `{file}` leaves the checkpoint directory"
            )));
        }
        let shard = match shards.get(file) {
            Some(s) => s.clone(),
            None => {
                let s = SafetensorsFile::open(&dir.join(file))?;
                shards.insert(file.to_string(), s.clone());
                s
            }
        };
        if shard.info(name).is_none() {
            return Err(bad(format!(
                "index maps `{name}` to {file}, which does not contain it"
            )));
        }
        out.push((name.clone(), shard));
    }
    Ok(out)
}

impl TensorSource for HfCheckpoint {
    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn stored(&self, name: &str, shape: &[usize], why: &str) -> Result<Stored> {
        let file = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })?;
        let info = file.info(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })?;
        if info.shape != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: info.shape.clone(),
                why: format!("from config.json {why}"),
            });
        }
        file.stored(name)
    }
}
