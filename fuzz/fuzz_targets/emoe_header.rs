//! The .emoe header parser on arbitrary bytes: it may reject them, never panic or read out of
//! bounds (the build runs under AddressSanitizer). Seed the corpus with a real .emoe file to reach
//! past the preamble quickly.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edgemoe::model::emoe::parse_header(data);
});
