//! The `specter` command: see `specter::cli`.

fn main() -> std::process::ExitCode {
    specter::cli::main()
}
