//! include/edgemoe.h is generated from src/capi.rs by cbindgen and checked in; this test fails when
//! it is stale. `EDGEMOE_BLESS=1 cargo test --test capi_header` rewrites it.

use std::path::Path;

#[test]
fn header_matches_the_c_api() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    // Only src/capi.rs: every exported item lives there, and the rest of the crate's `pub const`s
    // must not leak into the header.
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src/capi.rs"))
        .generate()
        .expect("cbindgen failed on src/capi.rs");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).expect("the header is UTF-8");

    let path = root.join("include/edgemoe.h");
    if std::env::var_os("EDGEMOE_BLESS").is_some() {
        std::fs::create_dir_all(root.join("include")).unwrap();
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "include/edgemoe.h is stale (or missing): regenerate it with \
         `EDGEMOE_BLESS=1 cargo test --test capi_header` and commit the result"
    );
}
