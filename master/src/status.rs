//! `nixq-status`: connects to every agent of the machines file in parallel
//! and prints what each says of itself, as a table or as JSON.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use nixq_common::proto::{AgentStatus, Counters};
use serde::Serialize;

use crate::agent_client::{AgentClient, AgentTarget};
use crate::exit;
use crate::target::{self, Credentials, MachinesSource, TargetError};

/// Default per-machine deadline: a LAN agent answers in milliseconds; five
/// seconds still covers a slow VPN without making a monitoring check hang.
pub const DEFAULT_TIMEOUT_SECS: u64 = 5;

/// Shows every nixq agent of the machines file: reachable or not, round
/// trip, version, systems, features, builds, load and free store space.
#[derive(Debug, Clone, Parser)]
#[command(name = "nixq-status", version)]
pub struct StatusArgs {
    /// The machines file [default: /etc/nix/machines].
    #[arg(long, value_name = "FILE", conflicts_with = "builders")]
    pub machines: Option<PathBuf>,
    /// A `builders` value instead of a file (entries separated by `;` or
    /// newlines).
    #[arg(long, value_name = "SPEC")]
    pub builders: Option<String>,
    /// The master's certificate and key [default: each entry's identity
    /// column, else /etc/nixq/master.pem].
    #[arg(long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// The CA of the agents' certificates [default: each entry's CA column,
    /// else /etc/nixq/ca.crt].
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for each agent.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_TIMEOUT_SECS)]
    pub timeout: u64,
}

/// What one machine said, or why it did not.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub machine: String,
    pub reachable: bool,
    pub rtt_ms: Option<f64>,
    pub agent_version: Option<String>,
    pub systems: Vec<String>,
    pub features: Vec<String>,
    pub running_builds: Option<u32>,
    pub max_jobs: Option<u32>,
    pub load_average: Option<f64>,
    pub free_store_bytes: Option<u64>,
    pub free_space_floor: Option<u64>,
    pub uptime_secs: Option<u64>,
    pub counters: Option<Counters>,
    pub error: Option<String>,
    /// The exit code this machine's failure would give `nixq-copy-closure`
    /// (3 unreachable, 4 certificate refused), 0 when reachable.
    #[serde(skip)]
    pub code: u8,
}

impl Row {
    fn down(machine: String, error: String, code: u8) -> Self {
        Self {
            machine,
            reachable: false,
            rtt_ms: None,
            agent_version: None,
            systems: Vec::new(),
            features: Vec::new(),
            running_builds: None,
            max_jobs: None,
            load_average: None,
            free_store_bytes: None,
            free_space_floor: None,
            uptime_secs: None,
            counters: None,
            error: Some(error),
            code,
        }
    }
}

/// The machines to ask, with their credentials.
pub fn targets(args: &StatusArgs) -> Result<Vec<AgentTarget>, TargetError> {
    let source = match &args.builders {
        Some(spec) => MachinesSource::Builders(spec.clone()),
        None => MachinesSource::file_or_default(args.machines.clone()),
    };
    let credentials = Credentials {
        identity: args.identity.clone(),
        ca: args.ca.clone(),
    };
    let limit = Duration::from_secs(args.timeout.max(1));
    Ok(target::load_machines(&source)?
        .iter()
        .map(|spec| {
            target::with_timeout(
                target::target_of(spec.uri.clone(), Some(spec), &credentials),
                limit,
            )
        })
        .collect())
}

/// Asks every target at once; rows in the order of the targets.
pub async fn collect(targets: Vec<AgentTarget>, timeout: Duration) -> Vec<Row> {
    let mut tasks = Vec::new();
    for target in targets {
        let target = Arc::new(target);
        tasks.push(tokio::spawn(async move {
            match tokio::time::timeout(timeout, ask(&target)).await {
                Ok(row) => row,
                Err(_) => Row::down(
                    target.uri.text.clone(),
                    format!("no answer within {} s", timeout.as_secs()),
                    exit::UNREACHABLE,
                ),
            }
        }));
    }
    let mut rows = Vec::with_capacity(tasks.len());
    for task in tasks {
        match task.await {
            Ok(row) => rows.push(row),
            Err(e) => rows.push(Row::down("?".into(), e.to_string(), exit::FAILURE)),
        }
    }
    rows
}

async fn ask(target: &AgentTarget) -> Row {
    let machine = target.uri.text.clone();
    let start = Instant::now();
    let client = match AgentClient::connect(
        target,
        &format!("nixq-status {}", env!("CARGO_PKG_VERSION")),
    )
    .await
    {
        Ok(client) => client,
        Err(e) => {
            let code = exit::client_exit_code(&e);
            return Row::down(machine, e.to_string(), code);
        }
    };
    let connected_in = start.elapsed();
    let welcome = client.welcome().clone();
    // The Welcome carries a status already; a Status stream adds one more
    // round trip but gives fresh counters. Use the Welcome's if it fails.
    let status: AgentStatus = client.status().await.unwrap_or(welcome.status.clone());
    let rtt = client.rtt().min(connected_in);
    client.close().await;
    Row {
        machine,
        reachable: true,
        rtt_ms: Some(rtt.as_secs_f64() * 1000.0),
        agent_version: Some(welcome.agent_version),
        systems: welcome.systems,
        features: welcome.features,
        running_builds: Some(status.running_builds),
        max_jobs: Some(status.max_jobs),
        load_average: Some(status.load_average),
        free_store_bytes: Some(status.free_store_bytes),
        free_space_floor: Some(status.free_space_floor),
        uptime_secs: Some(status.uptime_secs),
        counters: Some(status.counters),
        error: None,
        code: exit::OK,
    }
}

/// The exit code for a set of rows: 0 if every machine answered, else the
/// first failure's code (3 unreachable, 4 certificate refused, 1 other).
pub fn exit_code(rows: &[Row]) -> u8 {
    rows.iter()
        .map(|r| r.code)
        .find(|c| *c != exit::OK)
        .unwrap_or(exit::OK)
}

/// The rows as a text table (one header line, one line per machine, an
/// error line under each unreachable machine).
pub fn table(rows: &[Row]) -> String {
    let header = [
        "MACHINE",
        "REACHABLE",
        "RTT",
        "VERSION",
        "SYSTEMS",
        "FEATURES",
        "BUILDS",
        "LOAD",
        "FREE",
    ];
    let mut lines: Vec<[String; 9]> = vec![header.map(str::to_owned)];
    for row in rows {
        lines.push([
            row.machine.clone(),
            if row.reachable { "yes" } else { "no" }.to_owned(),
            row.rtt_ms.map_or("-".into(), |ms| format!("{ms:.1}ms")),
            row.agent_version.clone().unwrap_or_else(|| "-".into()),
            dash_if_empty(row.systems.join(",")),
            dash_if_empty(row.features.join(",")),
            match (row.running_builds, row.max_jobs) {
                (Some(r), Some(m)) => format!("{r}/{m}"),
                _ => "-".into(),
            },
            row.load_average.map_or("-".into(), |l| format!("{l:.2}")),
            row.free_store_bytes.map_or("-".into(), human_bytes),
        ]);
    }
    let mut widths = [0usize; 9];
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        let cells: Vec<String> = line
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
        if let Some(error) = i.checked_sub(1).and_then(|r| rows[r].error.as_ref()) {
            out.push_str(&format!("  error: {error}\n"));
        }
    }
    out
}

fn dash_if_empty(text: String) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text
    }
}

/// Bytes in binary units with one decimal (`12.3 GiB`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(machine: &str) -> Row {
        Row {
            machine: machine.into(),
            reachable: true,
            rtt_ms: Some(0.42),
            agent_version: Some("nixq-agent 0.1.0".into()),
            systems: vec!["x86_64-linux".into()],
            features: vec!["kvm".into(), "big".into()],
            running_builds: Some(1),
            max_jobs: Some(4),
            load_average: Some(0.5),
            free_store_bytes: Some(3 << 30),
            free_space_floor: Some(1 << 30),
            uptime_secs: Some(60),
            counters: Some(Counters::default()),
            error: None,
            code: exit::OK,
        }
    }

    #[test]
    fn table_and_codes() {
        let rows = vec![
            up("nixq://s1"),
            Row::down("nixq://s2".into(), "no answer".into(), exit::UNREACHABLE),
        ];
        let text = table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("MACHINE"));
        assert!(
            lines[1].contains("yes") && lines[1].contains("1/4") && lines[1].contains("3.0 GiB")
        );
        assert!(lines[1].contains("kvm,big") && lines[1].contains("0.4ms"));
        assert!(lines[2].starts_with("nixq://s2") && lines[2].contains("no"));
        assert_eq!(lines[3], "  error: no answer");
        assert_eq!(exit_code(&rows), exit::UNREACHABLE);
        assert_eq!(exit_code(&rows[..1]), exit::OK);
        assert_eq!(exit_code(&[]), exit::OK);
    }

    #[test]
    fn json_has_counters() {
        let json = serde_json::to_value([up("nixq://s1")]).expect("json");
        assert_eq!(json[0]["machine"], "nixq://s1");
        assert_eq!(json[0]["counters"]["paths_received"], 0);
        assert!(json[0].get("code").is_none());
    }

    #[test]
    fn units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 40), "5.0 TiB");
    }
}
