//! `nixq-bench`: the copy-closure benchmark of nixq against Nix's own ssh
//! transports (see `nixq_e2e::bench`). Needs root and Nix, like the
//! end-to-end tests; installs OpenSSH with apt-get if it is missing.
//!
//! ```text
//! cargo build --release --workspace --bins
//! target/release/nixq-bench [--scale 0.1] [--out bench.md] [--datasets mixed,small,huge,builds]
//!                           [--tools ncc,ncc-gzip,nix-copy,nixq,nixq-zstd] [--no-raw-quic]
//!                           [--logs DIR]
//! ```
//!
//! `nixq-bench gen …` is the builder of the data sets' derivations (run by
//! Nix, not by hand).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use nixq_e2e::bench::data::{self, DataSet, NodeSpec};
use nixq_e2e::bench::{self, Tool};

/// The `--datasets` key of the remote-build benchmark.
const BUILDS: &str = "builds";

#[derive(Debug, Parser)]
#[command(about = "Benchmark nixq-copy-closure against nix-copy-closure and nix copy over ssh")]
struct Cli {
    #[command(subcommand)]
    gen: Option<Gen>,
    /// Multiplies every data-set size (1 = 1 GiB mixed, 5,000 small paths, 2 GiB huge).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Also write the Markdown report to FILE.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Data sets to copy, comma-separated: mixed, small, huge; `builds`
    /// adds the remote-build benchmark (nixq-build-hook against ssh builders).
    #[arg(long, value_delimiter = ',', default_value = "mixed,small,huge,builds")]
    datasets: Vec<String>,
    /// Tools to time, comma-separated: ncc, ncc-gzip, nix-copy, nixq, nixq-zstd.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ncc,ncc-gzip,nix-copy,nixq,nixq-zstd"
    )]
    tools: Vec<String>,
    /// Copy every client's and daemon's log here at the end (replaced).
    #[arg(long, value_name = "DIR", default_value = "/tmp/nixq-bench-logs")]
    logs: PathBuf,
    /// Skip the raw QUIC baseline.
    #[arg(long)]
    no_raw_quic: bool,
}

#[derive(Debug, Subcommand)]
enum Gen {
    /// Derivation builder: writes a data-set node into $out.
    #[command(hide = true)]
    Gen {
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        random: u64,
        #[arg(long)]
        text: u64,
        #[arg(long, default_value = "")]
        refs: String,
    },
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nixq-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Gen::Gen {
        seed,
        random,
        text,
        refs,
    }) = cli.gen
    {
        let out = std::env::var_os("out").context("$out is not set: `gen` is a Nix builder")?;
        let spec = NodeSpec {
            seed,
            random,
            text,
            refs,
        };
        return data::generate_node(&spec, &PathBuf::from(out)).context("cannot write $out");
    }
    if !(cli.scale > 0.0 && cli.scale <= 16.0) {
        bail!("--scale must be in (0, 16], not {}", cli.scale);
    }
    let builds = cli.datasets.iter().any(|k| k == BUILDS);
    let datasets = cli
        .datasets
        .iter()
        .filter(|k| *k != BUILDS)
        .map(|k| {
            DataSet::ALL
                .into_iter()
                .find(|d| d.key() == k)
                .with_context(|| format!("unknown data set {k:?} (mixed, small, huge, builds)"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let tools = cli
        .tools
        .iter()
        .map(|k| {
            Tool::ALL
                .into_iter()
                .find(|t| t.key() == k)
                .with_context(|| format!("unknown tool {k:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let exe = std::env::current_exe()
        .and_then(|p| p.canonicalize())
        .context("cannot locate the nixq-bench binary")?;
    let text = exe.to_string_lossy();
    if text.contains(['"', '\\', '$', ' ']) {
        bail!("{text} cannot be a Nix builder path (quote, backslash, dollar or space in it)");
    }
    // The nixq programs are next to this binary (target/release).
    if std::env::var_os("NIXQ_BIN_DIR").is_none() {
        if let Some(dir) = exe.parent() {
            std::env::set_var("NIXQ_BIN_DIR", dir);
        }
    }
    let opts = bench::Options {
        scale: cli.scale,
        logs: Some(cli.logs),
        datasets,
        tools,
        raw_quic: !cli.no_raw_quic,
        builder: exe,
        builds,
    };
    let report = bench::run(&opts)?;
    println!("{report}");
    if let Some(out) = &cli.out {
        std::fs::write(out, &report).with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(())
}
