//! Fails early with a clear message when bpf-linker is missing, instead of a
//! linker error deep inside the nested cargo invocation.
fn main() {
    println!("cargo:rerun-if-env-changed=PATH");
    if which::which("bpf-linker").is_err() {
        println!("cargo:warning=bpf-linker is not on PATH; run `cargo xtask setup` to install it");
    }
}
