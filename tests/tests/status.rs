//! `nixq-status` against live agents: the table's facts come from the
//! agent, an unreachable machine is reported as such and makes the exit
//! status non-zero (for monitoring).

use std::time::Duration;

use nixq_e2e::nixq::{run_outcome, Agent, MasterCreds, Pki};
use nixq_e2e::{nixq_bin, Farm};

#[test]
fn status_reports_agents_and_fails_on_an_unreachable_one() {
    let farm = Farm::new("status")
        .and_then(|f| f.host("master"))
        .and_then(|f| f.host("s1"))
        .expect("farm");
    let (master, s1) = (&farm["master"], &farm["s1"]);
    let pki = Pki::generate().expect("PKI");
    let creds = MasterCreds::install(master, &pki, "master").expect("master creds");
    let config = Agent::install(
        s1,
        &pki,
        "max_builds = 3\nfeatures = [\"kvm\", \"big-parallel\"]\n",
    )
    .expect("agent files");
    let _agent = Agent::start(s1, &config).expect("agent starts");
    let status = nixq_bin("nixq-status").expect("nixq-status is built");

    let run = |machines: &str| {
        let file = master
            .write_file("etc/nix/status-machines", machines)
            .expect("machines file");
        let mut cmd = master.cmd(&status);
        cmd.arg("--machines")
            .arg(&file)
            .arg("--identity")
            .arg(&creds.identity)
            .arg("--ca")
            .arg(&creds.ca)
            .arg("--json");
        run_outcome(master, cmd, Duration::from_secs(60)).expect("nixq-status runs")
    };

    let up = run("nixq://s1 x86_64-linux - 3 1 kvm,big-parallel - -\n");
    assert_eq!(
        up.code,
        Some(0),
        "all reachable: exit 0; stderr: {}",
        up.stderr
    );
    let rows: serde_json::Value = serde_json::from_str(&up.stdout).expect("JSON output");
    let row = &rows[0];
    assert_eq!(row["reachable"], true, "{row}");
    assert_eq!(row["max_jobs"], 3, "{row}");
    assert_eq!(row["running_builds"], 0, "{row}");
    let features: Vec<&str> = row["features"]
        .as_array()
        .expect("features")
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    assert!(features.contains(&"kvm"), "{row}");
    assert!(
        row["free_store_bytes"].as_u64().is_some_and(|b| b > 0),
        "{row}"
    );
    assert!(row["rtt_ms"].as_f64().is_some(), "{row}");
    assert!(row["agent_version"].as_str().is_some(), "{row}");

    // 10.213.0.250 exists nowhere: inside the farm's private subnet, so the
    // attempt never leaves the namespaces.
    let down = run(
        "nixq://s1 x86_64-linux - 3 1 - - -\nnixq://10.213.0.250?connect-timeout=2 x86_64-linux - 1 1 - - -\n",
    );
    assert_ne!(
        down.code,
        Some(0),
        "an unreachable machine must fail the run"
    );
    let rows: serde_json::Value = serde_json::from_str(&down.stdout).expect("JSON output");
    assert_eq!(rows[0]["reachable"], true, "{rows}");
    assert_eq!(rows[1]["reachable"], false, "{rows}");
    assert!(
        rows[1]["error"].as_str().is_some(),
        "the reason is given: {rows}"
    );

    // The human table names both machines.
    let mut cmd = master.cmd(&status);
    cmd.arg("--builders")
        .arg("nixq://s1 x86_64-linux - 3 1 - - -")
        .arg("--identity")
        .arg(&creds.identity)
        .arg("--ca")
        .arg(&creds.ca);
    let table = run_outcome(master, cmd, Duration::from_secs(60)).expect("table");
    assert_eq!(table.code, Some(0), "{}", table.stderr);
    assert!(table.stdout.contains("nixq://s1"), "{}", table.stdout);
}
