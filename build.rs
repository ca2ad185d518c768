//! Sets `cfg(kiln_share_generics)` where rustc shares generic instances between crates: at
//! opt-levels 0, 1, s and z (its `-Zshare-generics` default), so in dev and test builds, not in
//! release. `src/lib.rs` then compiles the shared entry points once for the build's backend.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(kiln_share_generics)");
    println!("cargo::rerun-if-changed=build.rs");
    let opt = std::env::var("OPT_LEVEL").unwrap_or_default();
    if matches!(opt.as_str(), "0" | "1" | "s" | "z") {
        println!("cargo::rustc-cfg=kiln_share_generics");
    }
}
