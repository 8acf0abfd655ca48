//! The `specter` command: see `specter::cli`.

/// jemalloc, not the system allocator: after a flood of visitors left, glibc
/// kept the freed memory (a node stayed at 12× its idle RSS), while jemalloc
/// returns unused pages to the system within seconds (its background thread
/// purges them on a decay). Measured in `cargo bench --bench tunnel`
/// (README: Memory).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    specter::cli::main()
}
