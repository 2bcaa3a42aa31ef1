//! The trained fixture, and it quantized into an .emoe store (paging reads expert blocks from
//! one). Shared by the paging and expert-tier tests.

use edgemoe::quant::{self, store::write_emoe, Method, QuantOptions};
use edgemoe::Model;
use std::path::{Path, PathBuf};

pub fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trained-moe")
}

/// The trained fixture quantized (round to nearest) into `dir`.
pub fn quantized(dir: &Path) -> PathBuf {
    let model = Model::load(&fixture()).unwrap();
    let opts = QuantOptions {
        threads: 2,
        ..QuantOptions::new(Method::Rtn, &model)
    };
    let (q, _) = quant::quantize(model, &[], 0, &opts, |_, _, _| {}).unwrap();
    let path = dir.join("trained.emoe");
    write_emoe(&q, serde_json::json!({"method": "rtn"}), &path).unwrap();
    path
}
