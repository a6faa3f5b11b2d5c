//! The hook's answer to a "try", as pure functions: which machines are of
//! the right kind, which of them are usable now, and what to reply
//! (nix-interfaces.md §4.2, built on [`nixq_common::machines`]'s `eligible`,
//! `choose` and `decide`). The glue in [`super::run`] gathers the facts
//! (slot files, the back-off file, the agent's Welcome) and acts on the
//! result.
//!
//! Nix's rule, kept exactly: a machine that is disabled (here: in back-off,
//! or found unreachable by this process) does not count as "of the right
//! type", so with no other machine the request is declined rather than
//! postponed. nixq's addition: a machine whose agent says it is full, or
//! whose load average is above the machine's `max-load=`, is treated like
//! one whose slots are all taken (right type, no free slot), so the request
//! is postponed when the master cannot build it.

use nixq_common::machines::{self, Candidate, Decision, DecisionInput, MachineSpec, MaxLoad};
use nixq_common::proto::Welcome;

use super::modern::TryRequest;

/// What the master can build itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LocalCaps {
    /// `system` and `extra-platforms`.
    pub systems: Vec<String>,
    /// `system-features`.
    pub features: std::collections::BTreeSet<String>,
}

/// Indices of the machines that can take `request` by system and features.
pub fn eligible_machines(machines: &[MachineSpec], request: &TryRequest) -> Vec<usize> {
    machines
        .iter()
        .enumerate()
        .filter(|(_, m)| machines::eligible(m, &request.needed_system, &request.required_features))
        .map(|(i, _)| i)
        .collect()
}

/// An eligible machine at the moment of choice.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Availability {
    /// In back-off, or unreachable / unusable in this process: not counted.
    Disabled,
    /// Reachable, but its agent reports no free build slot.
    Full,
    /// What its slot files say: slots held by others, and whether we hold a
    /// free one.
    Slots { load: u32, free: bool },
}

/// One eligible machine as the choice sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct View {
    /// Index in the machines list.
    pub index: usize,
    pub availability: Availability,
}

/// The reply to a "try", Nix's way (§4.2 steps 3 and 5).
pub fn decide_try(
    machines: &[MachineSpec],
    views: &[View],
    request: &TryRequest,
    local: &LocalCaps,
) -> Decision {
    let can_build_locally = machines::can_build_locally(
        request.am_willing,
        &local.systems,
        &local.features,
        &request.needed_system,
        &request.required_features,
    );
    let candidates: Vec<Candidate> = views
        .iter()
        .filter_map(|v| match v.availability {
            Availability::Slots { load, free: true } => {
                let m = machines.get(v.index)?;
                Some(Candidate {
                    index: v.index,
                    load,
                    max_jobs: m.max_jobs,
                    speed_factor: m.speed_factor,
                })
            }
            _ => None,
        })
        .collect();
    machines::decide(DecisionInput {
        machines_configured: !machines.is_empty(),
        any_eligible: views
            .iter()
            .any(|v| v.availability != Availability::Disabled),
        chosen: machines::choose(&candidates),
        can_build_locally,
    })
}

/// What the agent's Welcome says about giving it this build.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Usable,
    /// Every build slot of the agent is in use (by any master).
    Full {
        running: u32,
        max_jobs: u32,
    },
    /// Its 1-minute load average is above the machine's `max-load=`.
    Overloaded {
        load: f64,
        limit: MaxLoad,
    },
    /// Its store is below its free-space floor: it would refuse the upload.
    LowSpace {
        free: u64,
        floor: u64,
    },
    /// It does not build this system, whatever the machines file says.
    WrongSystem {
        systems: Vec<String>,
    },
    /// Store paths are absolute: a different store directory cannot work.
    WrongStoreDir {
        theirs: String,
    },
}

impl Verdict {
    /// Whether the machine still counts as the right type (postpone rather
    /// than decline when it is the only one).
    pub fn is_busy(&self) -> bool {
        matches!(self, Self::Full { .. } | Self::Overloaded { .. })
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Usable => write!(f, "usable"),
            Self::Full { running, max_jobs } => {
                write!(f, "all its build slots are in use ({running}/{max_jobs})")
            }
            Self::Overloaded { load, limit } => write!(
                f,
                "its load average {load:.2} is above its max-load {}",
                limit.get()
            ),
            Self::LowSpace { free, floor } => write!(
                f,
                "its store is below the free-space floor ({free} bytes free, floor {floor})"
            ),
            Self::WrongSystem { systems } => {
                write!(f, "its agent builds only for {}", systems.join(", "))
            }
            Self::WrongStoreDir { theirs } => write!(f, "its store directory is {theirs}"),
        }
    }
}

/// Judges an agent from its Welcome for a build of `system` into
/// `store_dir`, on a machine whose entry sets `max_load` (`max-load=`).
pub fn verdict(
    welcome: &Welcome,
    system: &str,
    store_dir: &str,
    max_load: Option<MaxLoad>,
) -> Verdict {
    let status = &welcome.status;
    if welcome.store_dir != store_dir {
        return Verdict::WrongStoreDir {
            theirs: welcome.store_dir.clone(),
        };
    }
    if system != "builtin" && !welcome.systems.iter().any(|s| s == system) {
        return Verdict::WrongSystem {
            systems: welcome.systems.clone(),
        };
    }
    if status.free_space_floor > 0 && status.free_store_bytes < status.free_space_floor {
        return Verdict::LowSpace {
            free: status.free_store_bytes,
            floor: status.free_space_floor,
        };
    }
    if status.max_jobs > 0 && status.running_builds >= status.max_jobs {
        return Verdict::Full {
            running: status.running_builds,
            max_jobs: status.max_jobs,
        };
    }
    if let Some(limit) = max_load.filter(|l| l.exceeded_by(status.load_average)) {
        return Verdict::Overloaded {
            load: status.load_average,
            limit,
        };
    }
    Verdict::Usable
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use nixq_common::machines::{ForeignUris, ParseOptions};
    use nixq_common::proto::AgentStatus;
    use nixq_common::store_path::StorePath;

    use super::*;

    fn machines(text: &str) -> Vec<MachineSpec> {
        let options = ParseOptions {
            local_system: "x86_64-linux",
            foreign_uris: ForeignUris::Reject,
        };
        let mut no_includes = |_: &str, _: &str| Ok(None);
        machines::parse("test", text, &options, &mut no_includes)
            .expect("valid machines")
            .machines
    }

    fn request(am_willing: bool, system: &str, features: &[&str]) -> TryRequest {
        TryRequest {
            am_willing,
            needed_system: system.into(),
            drv_path: StorePath::parse_any("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x.drv")
                .expect("path"),
            required_features: features.iter().map(|f| (*f).to_owned()).collect(),
        }
    }

    fn local() -> LocalCaps {
        LocalCaps {
            systems: vec!["x86_64-linux".into()],
            features: BTreeSet::new(),
        }
    }

    fn slots(index: usize, load: u32, free: bool) -> View {
        View {
            index,
            availability: Availability::Slots { load, free },
        }
    }

    #[test]
    fn no_machines_declines_permanently() {
        let r = request(false, "x86_64-linux", &[]);
        assert_eq!(
            decide_try(&[], &[], &r, &local()),
            Decision::DeclinePermanently
        );
    }

    #[test]
    fn eligibility_by_system_and_features() {
        let ms = machines(
            "nixq://a aarch64-linux\nnixq://b x86_64-linux - 1 1 kvm\nnixq://c x86_64-linux - 1 1 - perf\n",
        );
        assert_eq!(
            eligible_machines(&ms, &request(true, "x86_64-linux", &[])),
            [1]
        );
        assert_eq!(
            eligible_machines(&ms, &request(true, "x86_64-linux", &["kvm"])),
            [1]
        );
        assert_eq!(
            eligible_machines(&ms, &request(true, "x86_64-linux", &["perf"])),
            [2]
        );
        assert_eq!(
            eligible_machines(&ms, &request(true, "builtin", &[])),
            [0, 1]
        );
        assert!(eligible_machines(&ms, &request(true, "riscv64-linux", &[])).is_empty());
    }

    #[test]
    fn wrong_system_declines_with_a_warning_when_not_local() {
        let ms = machines("nixq://a aarch64-linux\n");
        let r = request(false, "riscv64-linux", &[]);
        assert_eq!(
            decide_try(&ms, &[], &r, &local()),
            Decision::Decline { warn: true }
        );
        let r = request(true, "x86_64-linux", &[]);
        assert_eq!(
            decide_try(&ms, &[], &r, &local()),
            Decision::Decline { warn: false }
        );
    }

    #[test]
    fn all_slots_taken_postpones_unless_local() {
        let ms = machines("nixq://a x86_64-linux - 2\n");
        let views = [slots(0, 2, false)];
        assert_eq!(
            decide_try(&ms, &views, &request(false, "x86_64-linux", &[]), &local()),
            Decision::Postpone
        );
        assert_eq!(
            decide_try(&ms, &views, &request(true, "x86_64-linux", &[]), &local()),
            Decision::Decline { warn: false }
        );
        // An agent that says it is full counts the same.
        let full = [View {
            index: 0,
            availability: Availability::Full,
        }];
        assert_eq!(
            decide_try(&ms, &full, &request(false, "x86_64-linux", &[]), &local()),
            Decision::Postpone
        );
    }

    #[test]
    fn disabled_machines_do_not_count_as_the_right_type() {
        // Nix's rule: an unreachable machine is disabled, and with nothing
        // else the request is declined, not postponed.
        let ms = machines("nixq://a x86_64-linux\n");
        let views = [View {
            index: 0,
            availability: Availability::Disabled,
        }];
        assert_eq!(
            decide_try(&ms, &views, &request(false, "x86_64-linux", &[]), &local()),
            Decision::Decline { warn: true }
        );
    }

    #[test]
    fn least_loaded_per_speed_wins() {
        let ms = machines("nixq://a x86_64-linux - 4 1\nnixq://b x86_64-linux - 4 2\n");
        let r = request(false, "x86_64-linux", &[]);
        assert_eq!(
            decide_try(&ms, &[slots(0, 0, true), slots(1, 0, true)], &r, &local()),
            Decision::Accept(1)
        );
        assert_eq!(
            decide_try(&ms, &[slots(0, 0, true), slots(1, 2, true)], &r, &local()),
            Decision::Accept(0)
        );
        assert_eq!(
            decide_try(&ms, &[slots(0, 0, true), slots(1, 4, false)], &r, &local()),
            Decision::Accept(0)
        );
    }

    fn welcome(systems: &[&str], status: AgentStatus) -> Welcome {
        Welcome {
            version: 1,
            agent_version: "nixq-agent test".into(),
            store_dir: "/nix/store".into(),
            systems: systems.iter().map(|s| (*s).to_owned()).collect(),
            features: vec![],
            status,
        }
    }

    #[test]
    fn agent_verdicts() {
        let ok = AgentStatus {
            max_jobs: 2,
            running_builds: 1,
            free_store_bytes: 10,
            free_space_floor: 5,
            ..AgentStatus::default()
        };
        let w = welcome(&["x86_64-linux"], ok.clone());
        assert_eq!(
            verdict(&w, "x86_64-linux", "/nix/store", None),
            Verdict::Usable
        );
        assert_eq!(verdict(&w, "builtin", "/nix/store", None), Verdict::Usable);
        assert!(matches!(
            verdict(&w, "aarch64-linux", "/nix/store", None),
            Verdict::WrongSystem { .. }
        ));
        assert!(matches!(
            verdict(&w, "x86_64-linux", "/other/store", None),
            Verdict::WrongStoreDir { .. }
        ));
        let full = welcome(
            &["x86_64-linux"],
            AgentStatus {
                running_builds: 2,
                ..ok.clone()
            },
        );
        let v = verdict(&full, "x86_64-linux", "/nix/store", None);
        assert!(v.is_busy(), "{v}");
        let low = welcome(
            &["x86_64-linux"],
            AgentStatus {
                free_store_bytes: 4,
                ..ok
            },
        );
        let v = verdict(&low, "x86_64-linux", "/nix/store", None);
        assert!(matches!(v, Verdict::LowSpace { free: 4, floor: 5 }), "{v}");
        assert!(!v.is_busy());
    }

    #[test]
    fn a_machine_above_its_max_load_is_busy() {
        let ms = machines(
            "nixq://a?max-load=2.5 x86_64-linux - 4
",
        );
        let limit = ms[0].uri.params.max_load;
        assert_eq!(limit, MaxLoad::new(2.5));
        let status = |load_average| AgentStatus {
            max_jobs: 4,
            running_builds: 0,
            load_average,
            ..AgentStatus::default()
        };
        let w = welcome(&["x86_64-linux"], status(2.5));
        assert_eq!(
            verdict(&w, "x86_64-linux", "/nix/store", limit),
            Verdict::Usable,
            "at the limit is not above it"
        );
        let w = welcome(&["x86_64-linux"], status(3.75));
        let v = verdict(&w, "x86_64-linux", "/nix/store", limit);
        assert!(
            matches!(v, Verdict::Overloaded { load, .. } if load == 3.75),
            "{v}"
        );
        assert!(v.is_busy(), "postponed like a full agent, not declined");
        assert_eq!(
            v.to_string(),
            "its load average 3.75 is above its max-load 2.5"
        );
        // Without a limit the load does not matter.
        assert_eq!(
            verdict(&w, "x86_64-linux", "/nix/store", None),
            Verdict::Usable
        );
        // A full agent is reported as full first.
        let w = welcome(
            &["x86_64-linux"],
            AgentStatus {
                running_builds: 4,
                ..status(9.0)
            },
        );
        assert!(matches!(
            verdict(&w, "x86_64-linux", "/nix/store", limit),
            Verdict::Full { .. }
        ));
        // Busy means postpone when the master cannot build it itself.
        let busy = [View {
            index: 0,
            availability: Availability::Full,
        }];
        assert_eq!(
            decide_try(&ms, &busy, &request(false, "x86_64-linux", &[]), &local()),
            Decision::Postpone
        );
    }
}
