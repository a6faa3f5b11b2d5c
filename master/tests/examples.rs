//! The shipped example machines file parses, so it cannot drift from the
//! parser.

use nixq_common::machines::{self, ForeignUris, FsIncludes, ParseOptions};

#[test]
fn shipped_machines_example_parses() {
    let text = include_str!("../../packaging/examples/machines");
    let options = ParseOptions {
        local_system: "x86_64-linux",
        foreign_uris: ForeignUris::Reject,
    };
    let parsed = machines::parse(
        "packaging/examples/machines",
        text,
        &options,
        &mut FsIncludes,
    )
    .expect("the example machines file parses");
    assert_eq!(parsed.machines.len(), 4);
    let bench = &parsed.machines[3];
    assert!(bench.mandatory_features.contains("benchmark"));
    assert_eq!(parsed.machines[0].max_jobs, 8);
}
