use std::process::ExitCode;

use clap::Parser;
use eventstream_host::config::{Cli, Command, ServerConfig};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => {
            ServerConfig::from_args(*args).and_then(eventstream_host::server::serve)
        }
        Command::Load(args) => eventstream_host::load::run(&args),
        Command::Inspect(args) => eventstream_host::inspect::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("eventstream: error: {e}");
            ExitCode::FAILURE
        }
    }
}
