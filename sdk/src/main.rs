//! `patchbay`: the command-line client of `patchbayd`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
