//! `nixq-status`: parse, ask every agent, print, exit code (see
//! `nixq_master::status`).

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser as _;
use nixq_common::telemetry::{self, LogFormat};
use nixq_master::exit;
use nixq_master::status::{self, StatusArgs};

fn main() -> ExitCode {
    let args = StatusArgs::parse();
    telemetry::init(LogFormat::Text, "warn");
    let targets = match status::targets(&args) {
        Ok(targets) => targets,
        Err(e) => {
            eprintln!("nixq-status: {e}");
            return ExitCode::from(if e.is_usage() {
                exit::USAGE
            } else {
                exit::FAILURE
            });
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("nixq-status: cannot start the runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    // A little beyond the connect timeout, for the Hello and Status.
    let timeout = Duration::from_secs(args.timeout.max(1) + 2);
    let rows = runtime.block_on(status::collect(targets, timeout));
    if args.json {
        match serde_json::to_string_pretty(&rows) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("nixq-status: {e}");
                return ExitCode::from(exit::FAILURE);
            }
        }
    } else {
        print!("{}", status::table(&rows));
    }
    ExitCode::from(status::exit_code(&rows))
}
