//! The `userconfig` binary: see the `userconfig_cli` library for the commands.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    userconfig_cli::main()
}
