//! The extension finds libtorch where pip puts torch: next to the package, in
//! `site-packages/torch/lib` (normally torch is imported first and its copy is used).
fn main() {
    println!("cargo:rustc-link-arg-cdylib=-Wl,-rpath,$ORIGIN/../torch/lib");
}
