//! GGUF dequantization against the `gguf` Python package (0.19): every quantized tensor of
//! tests/fixtures/gguf-quants/quants.gguf (written by tools/make_gguf_quant_fixtures.py) must
//! decode to exactly the f32 bits the package gave, stored beside it as `NAME.expected`.

use edgemoe::model::gguf::GgufFile;
use edgemoe::model::weights::Stored;
use std::path::Path;

fn f32s(s: Stored) -> Vec<f32> {
    match s {
        Stored::F32(b) => b.to_vec(),
        _ => panic!("expected f32 values"),
    }
}

#[test]
fn every_quantized_type_decodes_bit_exactly_as_the_gguf_package_does() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf-quants/quants.gguf");
    let f = GgufFile::open(&path).unwrap();
    let mut types = vec![];
    for (name, info) in f.tensors() {
        if name.ends_with(".expected") {
            continue;
        }
        let want = f32s(f.read(&format!("{name}.expected")).unwrap());
        let got = f32s(f.read(name).unwrap());
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{name}[{i}]: {g} vs gguf's {w}");
        }
        types.push(info.ty.name());
    }
    types.sort();
    types.dedup();
    assert_eq!(
        types,
        ["MXFP4", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "Q8_0"],
        "the fixture covers every quantized type edgemoe reads"
    );
}
