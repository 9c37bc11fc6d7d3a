//! Makes the agent's thread-local storage static even when the library is loaded by
//! `dlopen` (the injected agent, issue 13).
//!
//! Generated code and signal handlers read the agent's thread-locals at a fixed
//! `fs`-relative offset (`hot::block::tls_offsets`), which exists only when the object's
//! TLS block sits in the static TLS area of every thread. Objects loaded at start-up
//! always get that; an object `dlopen`ed later gets it only when it uses the
//! initial-exec model (the linker then marks it `DF_STATIC_TLS`, and the loader places
//! its whole block in the static TLS surplus, initialized in every existing thread, or
//! refuses the `dlopen` with "cannot allocate memory in static TLS block"). Rust's
//! thread-locals in a shared object use the general-dynamic model, so this module adds
//! one initial-exec access: an 8-byte thread-local of its own, read through
//! `@GOTTPOFF` by a function nobody calls. That reference alone makes the linker emit a
//! `R_X86_64_TPOFF64` relocation and set `DF_STATIC_TLS`; the general-dynamic accesses
//! then resolve into the same static block (glibc's `__tls_get_addr` uses the static
//! offset of a module that has one). The agent's TLS is a few hundred bytes; glibc
//! reserves 512 bytes of surplus for such objects (`glibc.rtld.optional_static_tls`).
//! Pure data and one unreachable function: nothing here runs.

std::arch::global_asm!(
    ".pushsection .tbss,\"awT\",@nobits",
    ".balign 8",
    ".local patchbay_static_tls_anchor",
    "patchbay_static_tls_anchor:",
    ".zero 8",
    ".popsection",
    ".pushsection .text.patchbay_static_tls_probe,\"ax\",@progbits",
    ".globl patchbay_static_tls_probe",
    ".hidden patchbay_static_tls_probe",
    "patchbay_static_tls_probe:",
    "mov rax, qword ptr [rip + patchbay_static_tls_anchor@GOTTPOFF]",
    "mov rax, qword ptr fs:[rax]",
    "ret",
    ".popsection",
);

unsafe extern "C" {
    /// Reads the anchor through the initial-exec model (never called at run time; the
    /// reference keeps it in the link).
    fn patchbay_static_tls_probe() -> u64;
}

/// Keeps the probe (and so its relocation) in the linked object: the address is taken
/// by `#[used]` data, never called.
#[used]
static KEEP: unsafe extern "C" fn() -> u64 = patchbay_static_tls_probe;
