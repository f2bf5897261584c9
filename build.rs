//! The `dist` sidecar's text is linked in the order of `link/pylon.order`
//! (ADR 21): the functions a sidecar runs, from start-up through serving,
//! sit together at the front of `.text`, so the pages it touches are few and
//! what it never runs stays out of its resident set.
//!
//! Only the `dist` profile (the image's binaries) and only on
//! `x86_64-unknown-linux-gnu`, where rustc links with LLD by default. A
//! symbol the file names that the build does not have is skipped without a
//! word, so a stale file costs resident pages, never a failed build.
//!
//! The same build packs the relative relocations (`-z pack-relative-relocs`):
//! the loader reads a few KB of them at start, not ~330 KB.
//!
//! `PYLON_TEXT_ORDER=0` turns both off: the linker's own order, and
//! relocations as they were.
//!
//! Regenerate the file from a `dist` binary:
//! `benches/peers/profile.py --pylon target/dist/pylon --mode order`.

use std::env;
use std::path::Path;

const ORDER: &str = "link/pylon.order";

fn main() {
    println!("cargo::rerun-if-changed={ORDER}");
    println!("cargo::rerun-if-env-changed=PYLON_TEXT_ORDER");
    let out_dir = env::var("OUT_DIR").unwrap_or_default();
    // OUT_DIR is <target dir>/[<triple>/]<profile>/build/<package>-<hash>/out.
    let profile = Path::new(&out_dir)
        .ancestors()
        .nth(3)
        .and_then(Path::file_name)
        .and_then(|name| name.to_str());
    let target = env::var("TARGET").unwrap_or_default();
    let wanted = env::var("PYLON_TEXT_ORDER").as_deref() != Ok("0");
    if profile != Some("dist") || target != "x86_64-unknown-linux-gnu" || !wanted {
        return;
    }
    let order = Path::new(&env::var("CARGO_MANIFEST_DIR").unwrap_or_default()).join(ORDER);
    // -Xlinker pairs: a path may hold the commas that -Wl, splits at.
    for arg in [
        "--symbol-ordering-file",
        &order.display().to_string(),
        "--no-warn-symbol-ordering",
        // Relative relocations packed (DT_RELR, glibc 2.36 and later: the
        // image's Debian 12 has 2.36): the loader reads a few KB at start
        // instead of a `.rela.dyn` of ~330 KB.
        "-z",
        "pack-relative-relocs",
    ] {
        println!("cargo::rustc-link-arg-bin=pylon=-Xlinker");
        println!("cargo::rustc-link-arg-bin=pylon={arg}");
    }
}
