//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! The object is built separately (Debian's rustc for bpfel-unknown-none, see
//! shared/TOOLCHAIN.md), so plain `cargo build`/`cargo test` stay host-only
//! and unprivileged. When the object is missing, an empty placeholder is
//! embedded and the agent refuses to load it with an error that names the
//! command to run.

use std::{env, fs, path::PathBuf};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    println!("cargo::rerun-if-env-changed=FAROL_EBPF_OBJECT");
    let object = env::var_os("FAROL_EBPF_OBJECT").map_or_else(
        || manifest_dir.join("../target/ebpf/bpfel-unknown-none/release/farol-ebpf"),
        PathBuf::from,
    );
    println!("cargo::rerun-if-changed={}", object.display());
    let embedded = out_dir.join("farol.bpf.o");
    match fs::read(&object) {
        Ok(bytes) => fs::write(&embedded, bytes).expect("write the embedded eBPF object"),
        Err(_) => {
            println!(
                "cargo::warning=eBPF object {} not found: the agent will refuse to load the data plane until `cargo xtask build-ebpf` has run",
                object.display()
            );
            fs::write(&embedded, []).expect("write the eBPF placeholder");
        }
    }
}
