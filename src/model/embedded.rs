//! The built-in trained model (`builtin:trained`, the default): tests/fixtures/trained-moe, a
//! 3.9 M-parameter Mixtral trained on the King James Bible, embedded in the binary with its
//! weights rounded to bf16 by build/trained.rs (7.7 MB instead of 15.5 MB of f32), so an installed
//! binary prints readable text from any directory. It loads through the same safetensors,
//! config and tokenizer code as a checkpoint directory, from memory; bf16 matrices run as stored.

#![warn(missing_docs)]

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::hf::HfCheckpoint;
use crate::model::safetensors::SafetensorsFile;
use crate::model::tokenizer::Tokenizer;
use crate::model::weights::WeightForm;
use crate::model::{arch, buf, Model};
use std::path::Path;

/// The name the embedded model goes by in reports and errors.
pub const NAME: &str = "builtin:trained";

const CONFIG: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/trained-moe/config.json"));
const GENERATION_CONFIG: &[u8] = include_bytes!(concat!(
    env!("OUT_DIR"),
    "/trained-moe/generation_config.json"
));
const TOKENIZER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/trained-moe/tokenizer.json"));
/// Byte-aligned as included; [`load`] copies it into a page-aligned map so the bf16 tensors
/// (2-byte aligned inside the file, see build/trained.rs) are used in place, not copied again.
const SAFETENSORS: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/trained-moe/model.safetensors"));

/// Bytes the embedded model adds to the binary.
pub const EMBEDDED_BYTES: usize =
    CONFIG.len() + GENERATION_CONFIG.len() + TOKENIZER.len() + SAFETENSORS.len();

// The limit for what the built-in model may add to the binary.
const _: () = assert!(
    EMBEDDED_BYTES <= 8_000_000,
    "the embedded model exceeds 8 MB"
);

/// Loads the embedded model.
pub fn load() -> Result<Model> {
    let origin = Path::new(NAME);
    let json = |bytes: &[u8], file: &str| {
        serde_json::from_slice::<serde_json::Value>(bytes)
            .map_err(|e| Error::config(origin.join(file), "(file)", format!("not valid JSON: {e}")))
    };
    let mut config = ModelConfig::from_json(&json(CONFIG, "config.json")?, origin)?;
    config.apply_generation_config(&json(GENERATION_CONFIG, "generation_config.json")?);
    let tokenizer = Tokenizer::from_json_bytes(TOKENIZER, &origin.join("tokenizer.json"))?;
    let map = buf::map_copy_of(SAFETENSORS).map_err(|e| Error::io(origin, e))?;
    let file = SafetensorsFile::from_map(&origin.join("model.safetensors"), map)?;
    let ckpt = HfCheckpoint::single(origin, file);
    let weights = arch::load_weights(&config, &ckpt, WeightForm::AsStored)?;
    Ok(Model {
        config,
        weights,
        tokenizer,
        source: NAME.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::buf::HalfKind;
    use crate::model::weights::Stored;

    /// Every embedded tensor is the f32 fixture's, rounded to the nearest bf16 (the rounding
    /// `half` does, not build/trained.rs' own code), with the same names and shapes.
    #[test]
    fn embedded_tensors_are_the_f32_fixture_rounded_to_bf16() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trained-moe");
        let f32s = SafetensorsFile::open(&dir.join("model.safetensors")).unwrap();
        let map = buf::map_copy_of(SAFETENSORS).unwrap();
        let bf16s = SafetensorsFile::from_map(Path::new(NAME), map).unwrap();
        let names = |f: &SafetensorsFile| f.tensors().keys().cloned().collect::<Vec<_>>();
        assert_eq!(names(&f32s), names(&bf16s));
        for (name, info) in f32s.tensors() {
            assert_eq!(bf16s.info(name).unwrap().shape, info.shape, "{name}");
            let Stored::Half(HalfKind::Bf16, bits) = bf16s.stored(name).unwrap() else {
                panic!("{name} is not bf16 in the embedded model");
            };
            assert!(bits.is_mapped(), "{name}: aligned, so used in place");
            let want: Vec<u16> = f32s
                .read_f32(name)
                .unwrap()
                .iter()
                .map(|&v| HalfKind::Bf16.from_f32(v))
                .collect();
            assert!(*bits == want[..], "{name}: not the fixture rounded to bf16");
        }
    }
}
