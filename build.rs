//! Compiles every `bpf/*.bpf.c` (the datapaths) and `tests/bench/bpf/*.bpf.c`
//! (programs only the benches load) into a BPF object and a Rust skeleton
//! in `OUT_DIR/<name>.skel.rs`.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

use libbpf_cargo::SkeletonBuilder;

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("CARGO_CFG_TARGET_ARCH is set by cargo");
    // The UAPI headers include <asm/types.h>, which Debian keeps under the
    // multiarch directory; clang -target bpf does not look there by itself.
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    // The register names of kprobe arguments (bpf_tracing.h).
    let target_arch = match arch.as_str() {
        "x86_64" => "-D__TARGET_ARCH_x86",
        "aarch64" => "-D__TARGET_ARCH_arm64",
        other => panic!("no BPF kprobe register layout for {other}"),
    };

    println!("cargo:rerun-if-changed=include");
    println!("cargo:rerun-if-changed=bpf/lib");
    let sources = ["bpf", "tests/bench/bpf"].into_iter().flat_map(|dir| {
        fs::read_dir(dir)
            .unwrap_or_else(|err| panic!("{dir}/: {err}"))
            .map(|entry| entry.expect("readable directory entry").path())
    });
    for path in sources {
        let Some(name) = bpf_program_name(&path) else {
            continue;
        };
        println!("cargo:rerun-if-changed={}", path.display());
        SkeletonBuilder::new()
            .source(&path)
            .clang_args([
                "-Wall",
                "-Werror",
                "-Iinclude",
                "-Ibpf",
                "-I",
                multiarch.as_str(),
                target_arch,
            ])
            .build_and_generate(out_dir.join(format!("{name}.skel.rs")))
            .unwrap_or_else(|err| panic!("building {}: {err:#}", path.display()));
    }
}

/// `bpf/port_nat.bpf.c` -> `Some("port_nat")`; anything else -> `None`.
fn bpf_program_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    file.strip_suffix(".bpf.c").map(str::to_owned)
}
