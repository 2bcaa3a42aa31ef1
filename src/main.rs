//! The `edgemoe` command line: parse, call the library, print. Errors end as one line on stderr.

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = edgemoe::cli::parse();
    match edgemoe::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
