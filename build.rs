//! Link set-up for libtorch (docs/architecture.md, "Linking libtorch").
//!
//! - Stops, with one sentence naming the set-up command, when libtorch is missing. (A cold
//!   build meets the same sentence earlier, in torch-sys's C++ step: see
//!   scripts/libtorch-missing/torch/torch.h.)
//! - Adds an rpath to libtorch's directory so binaries run without LD_LIBRARY_PATH.
//! - Keeps libtorch_cuda linked (`--no-as-needed`) so that CUDA works on GPU hosts.
//! - Compiles src/train/determinism.cpp and src/train/adam_update.cpp: libtorch settings and
//!   calls tch does not expose.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/train/determinism.cpp");
    println!("cargo:rerun-if-changed=src/train/adam_update.cpp");
    let libtorch = std::env::var_os("LIBTORCH").map(PathBuf::from);
    let lib_dir = libtorch.as_ref().map(|root| root.join("lib"));
    let found = lib_dir
        .as_ref()
        .is_some_and(|dir| dir.join("libtorch.so").exists());
    if !found {
        eprintln!(
            "error: libtorch not found (LIBTORCH={}): run `scripts/setup` once, which installs PyTorch 2.11.0 into .venv, then build again.",
            libtorch
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "unset".into())
        );
        std::process::exit(1);
    }
    let root = libtorch.expect("found above");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .file("src/train/determinism.cpp")
        .file("src/train/adam_update.cpp")
        .compile("patchgd_torch");
    let lib_dir = lib_dir.unwrap();
    let lib_dir = lib_dir.canonicalize().unwrap_or(lib_dir);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    // The linker drops libtorch_cuda (nothing references its symbols directly; it registers
    // the CUDA backend when loaded), so keep it explicitly wherever the argument lands.
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-L{}", lib_dir.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
