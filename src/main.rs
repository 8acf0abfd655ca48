//! The `specter` command: see `specter::cli`.

/// jemalloc, not the system allocator: after a flood of visitors left, glibc
/// kept the freed memory (a node stayed at 12× its idle RSS), while jemalloc
/// returns unused pages to the system within seconds (its background thread
/// purges them on a decay). Measured in `cargo bench --bench tunnel`
/// (README: Memory).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The C maths library's `pow`, from the pure-Rust `libm` crate (a port of
/// musl's). tokio's multi-thread scheduler calls it (its poll-time EWMA,
/// `f64::powf`), and it was the last function the binary took from
/// libm.so: defined here, the linker drops that library, about 0.5 MiB of
/// each process's RSS (README: Memory). The executable's dynamic symbol
/// table lists it, so a shared library loaded later would bind to this
/// `pow` too: musl's, accurate to within an ulp as glibc's is. The other crates
/// forbid unsafe code outright; this item alone is allowed it.
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

fn main() -> std::process::ExitCode {
    specter::cli::main()
}
