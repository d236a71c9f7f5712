//! The `imgfs` binary: parse the command line, run the command, print errors as one line.

fn main() -> std::process::ExitCode {
    imgfs::cli::main()
}
