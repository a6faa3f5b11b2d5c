//! `nixq-copy-closure`: parse, resolve, run, exit code (see
//! `nixq_master::copy`).

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser as _;
use nixq_common::telemetry::{self, LogFormat};
use nixq_master::copy::{self, CopyArgs, Plan};
use nixq_master::exit;

fn main() -> ExitCode {
    nixq_common::alloc::limit_malloc_arenas();
    let args = CopyArgs::parse();
    let directive = match args.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    telemetry::init(LogFormat::Text, directive);
    let verbose = args.verbose > 0;
    let quiet = args.quiet;
    let plan = match Plan::resolve(args, &mut std::io::stdin().lock()) {
        Ok(plan) => plan,
        Err(e) => return fail(&e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("nixq-copy-closure: cannot start the runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let started = std::time::Instant::now();
    match runtime.block_on(copy::run(&plan)) {
        Ok(report) => {
            if verbose || (!quiet && std::io::stderr().is_terminal() && report.copied > 0) {
                match report.closure {
                    Some(closure) => eprintln!(
                        "copied {} of {} paths ({:.1} MiB) in {:.2} s",
                        report.copied,
                        closure,
                        report.bytes as f64 / f64::from(1 << 20),
                        started.elapsed().as_secs_f64()
                    ),
                    None => eprintln!(
                        "nothing to copy: the agent has every path asked for, so their closures too ({:.2} s)",
                        started.elapsed().as_secs_f64()
                    ),
                }
            }
            ExitCode::from(exit::OK)
        }
        Err(e) => fail(&e),
    }
}

fn fail(error: &copy::CopyError) -> ExitCode {
    eprintln!("nixq-copy-closure: {error}");
    ExitCode::from(exit::copy_exit_code(error))
}
