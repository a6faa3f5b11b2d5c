//! The benchmark's results as a Markdown table, ready to paste into README.md.

use std::fmt::Write as _;
use std::time::Duration;

use super::data::human_bytes;

/// One measured (or failed) run.
#[derive(Debug, Clone)]
pub struct Row {
    /// Data set description.
    pub dataset: String,
    /// The data set's NAR bytes and path count.
    pub nar_bytes: u64,
    pub paths: usize,
    /// Tool label (`nix-copy-closure`, `nixq-copy-closure --zstd`, …).
    pub tool: String,
    /// `true` for the no-op copy (everything already present).
    pub noop: bool,
    /// The measurement, or the error that prevented it.
    pub result: Result<Measured, String>,
}

/// What one successful run measured.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    pub wall: Duration,
    /// Peak RSS of the client process (and the descendants it reaped), KiB.
    pub client_rss_kib: u64,
    /// Peak RSS of the receiving side (agent, or the ssh session's command), KiB.
    pub receiver_rss_kib: Option<u64>,
}

/// Everything the report shows besides the rows.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub date: String,
    pub machine: String,
    pub scale: f64,
    /// Raw QUIC throughput: bytes and time, or an error.
    pub raw_quic: Option<Result<(u64, Duration), String>>,
    /// Time of `ssh host true`.
    pub ssh_connect: Option<Duration>,
    pub notes: Vec<String>,
}

fn mb_per_s(bytes: u64, wall: Duration) -> f64 {
    bytes as f64 / 1e6 / wall.as_secs_f64().max(1e-9)
}

fn fmt_wall(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{:.0} ms", d.as_secs_f64() * 1000.0)
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

fn fmt_rss(kib: u64) -> String {
    format!("{:.0} MiB", kib as f64 / 1024.0)
}

/// The reference tool, whose wall time the ratio column divides by.
pub const REFERENCE_TOOL: &str = "nix-copy-closure";

/// Renders the report.
pub fn render(ctx: &Context, rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### Copy-closure benchmark ({})\n", ctx.date);
    let _ = writeln!(out, "{}  ", ctx.machine);
    let _ = writeln!(
        out,
        "Master and slave are network namespaces on one machine (veth, MTU 1500), each with its own `/nix`; \
         data scale {}. MB/s = NAR bytes / wall time (10^6 bytes). \"vs ncc\" = `nix-copy-closure` wall time / this \
         wall time (higher is better). Receiver RSS: the agent's VmHWM for nixq, the remote \
         `nix-store --serve` / `nix-daemon --stdio` for ssh.\n",
        ctx.scale
    );
    if let Some(raw) = &ctx.raw_quic {
        match raw {
            Ok((bytes, wall)) => {
                let _ = writeln!(
                    out,
                    "Physical limit: one quinn connection, one stream, nixq's transport settings and mTLS: \
                     **{:.0} MB/s** ({} in {}).  ",
                    mb_per_s(*bytes, *wall),
                    human_bytes(*bytes),
                    fmt_wall(*wall)
                );
            }
            Err(e) => {
                let _ = writeln!(out, "Physical limit: raw quinn run failed: {e}  ");
            }
        }
    }
    if let Some(d) = ctx.ssh_connect {
        let _ = writeln!(
            out,
            "ssh connection setup (`ssh s1 true`): {}.",
            fmt_wall(d)
        );
    }
    out.push('\n');
    out.push_str(
        "| data set | tool | copy | wall | MB/s | vs ncc | client RSS | receiver RSS |\n\
         |---|---|---|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        let reference = rows
            .iter()
            .find(|r| r.dataset == row.dataset && r.noop == row.noop && r.tool == REFERENCE_TOOL);
        let kind = if row.noop { "no-op" } else { "fresh" };
        let set = format!(
            "{} ({}, {} NAR)",
            row.dataset,
            row.paths,
            human_bytes(row.nar_bytes)
        );
        match &row.result {
            Ok(m) => {
                let speed = if row.noop {
                    "–".to_owned()
                } else {
                    format!("{:.0}", mb_per_s(row.nar_bytes, m.wall))
                };
                let ratio = match reference.map(|r| &r.result) {
                    Some(Ok(base)) => {
                        format!(
                            "{:.2}×",
                            base.wall.as_secs_f64() / m.wall.as_secs_f64().max(1e-9)
                        )
                    }
                    _ => "–".to_owned(),
                };
                let _ = writeln!(
                    out,
                    "| {set} | {} | {kind} | {} | {speed} | {ratio} | {} | {} |",
                    row.tool,
                    fmt_wall(m.wall),
                    fmt_rss(m.client_rss_kib),
                    m.receiver_rss_kib.map_or("–".to_owned(), fmt_rss),
                );
            }
            Err(e) => {
                let e = e.replace('|', "\\|").replace('\n', " ");
                let _ = writeln!(
                    out,
                    "| {set} | {} | {kind} | failed: {e} | | | | |",
                    row.tool
                );
            }
        }
    }
    for note in &ctx.notes {
        let _ = writeln!(out, "\n{note}");
    }
    out
}

/// One remote-build run (or its failure): see [`super::builds`].
#[derive(Debug, Clone)]
pub struct BuildRow {
    /// What was built (`100 independent trivial derivations`, …).
    pub workload: String,
    pub derivations: usize,
    /// Who distributed the builds.
    pub tool: String,
    /// Wall time of `nix-build` on the master, or the error.
    pub result: Result<Duration, String>,
}

/// The tool the remote-build table's ratio column divides by.
pub const BUILD_REFERENCE_TOOL: &str = "Nix's own hook (`ssh://root@s1`)";

/// Renders the remote-build table and its notes.
pub fn render_builds(rows: &[BuildRow], notes: &[String]) -> String {
    let mut out = String::from(
        "\n### Remote-build benchmark\n\n\
         | builds | tool | wall | per derivation | vs ssh |\n\
         |---|---|---:|---:|---:|\n",
    );
    for row in rows {
        let reference = rows
            .iter()
            .find(|r| r.workload == row.workload && r.tool == BUILD_REFERENCE_TOOL);
        match &row.result {
            Ok(wall) => {
                let ratio = match reference.map(|r| &r.result) {
                    Some(Ok(base)) => {
                        format!("{:.2}×", base.as_secs_f64() / wall.as_secs_f64().max(1e-9))
                    }
                    _ => "–".to_owned(),
                };
                let each = *wall / u32::try_from(row.derivations.max(1)).unwrap_or(u32::MAX);
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {ratio} |",
                    row.workload,
                    row.tool,
                    fmt_wall(*wall),
                    fmt_wall(each),
                );
            }
            Err(e) => {
                let e = e.replace('|', "\\|").replace('\n', " ");
                let _ = writeln!(out, "| {} | {} | failed: {e} | | |", row.workload, row.tool);
            }
        }
    }
    for note in notes {
        let _ = writeln!(out, "\n{note}");
    }
    out
}
