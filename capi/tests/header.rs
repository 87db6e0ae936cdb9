//! include/rtrs.h is what cbindgen makes of the crate now: regenerated into
//! memory and compared. `RTRS_BLESS=1 cargo test -p rtrs-capi --test header`
//! rewrites it.

use std::path::Path;

#[test]
fn the_checked_in_header_is_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config =
        cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("capi/cbindgen.toml");
    let mut made = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen cannot read the crate")
        .write(&mut made);
    let path = dir.join("include/rtrs.h");
    if std::env::var_os("RTRS_BLESS").is_some() {
        std::fs::write(&path, &made).expect("write include/rtrs.h");
        return;
    }
    let have = std::fs::read(&path).unwrap_or_default();
    assert!(
        have == made,
        "capi/include/rtrs.h is out of date: run `RTRS_BLESS=1 cargo test -p rtrs-capi --test header` \
         and commit it"
    );
}
