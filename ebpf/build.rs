//! Options for bpf-linker, which compiles the whole object.
//!
//! No `rerun-if-changed` is needed for this file: a changed build script is rebuilt and run
//! again, and the eBPF binaries relinked with what it prints; `aya-build` (in the
//! dataplane's build script) watches this whole directory, so a change here rebuilds the
//! object the dataplane embeds.
fn main() {
    // By default bpf-linker asks LLVM to expand memcpy "in order" (for offloading JITs'
    // pattern matchers), and that turns every memset and memmove into a call to a byte-wise
    // loop: over 30 calls in the packet path, a 64-byte copy costing ~400 instructions.
    // Without it LLVM expands them inline, as the widest stores the alignment allows.
    println!("cargo:rustc-link-arg=--disable-expand-memcpy-in-order");
}
