//! Gives every binary and test of this crate an rpath to libtorch, so they run without
//! `LD_LIBRARY_PATH`. torch-sys exports its library directory to direct dependents as
//! `DEP_TCH_LIBTORCH_LIB`; link flags in RUSTFLAGS would also hit build scripts and break them.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
            // The default `--as-needed` drops libtorch_cuda (nothing references it by symbol),
            // and then CUDA is silently unavailable.
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}
