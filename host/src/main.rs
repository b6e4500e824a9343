//! `eventstream`: the server (`serve`), the load generator (`load`), the log
//! inspector (`inspect`) and the line producer (`produce`); see
//! docs/operations.md.

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

use std::process::ExitCode;

use clap::Parser;
use eventstream_host::config::{Cli, Command, ServerConfig};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // One line: clap's first line, without its usage block.
            let text = e.to_string();
            let line = text.lines().next().unwrap_or("bad arguments");
            let line = line.strip_prefix("error: ").unwrap_or(line);
            eprintln!("eventstream: error: {line} (see --help)");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Serve(args) => {
            ServerConfig::from_args(*args).and_then(eventstream_host::server::serve)
        }
        Command::Load(args) => eventstream_host::load::run(&args),
        Command::Inspect(args) => eventstream_host::inspect::run(&args),
        Command::Produce(args) => eventstream_host::produce::run(&args),
        Command::Consume(args) => eventstream_host::consume::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("eventstream: error: {e}");
            ExitCode::FAILURE
        }
    }
}
