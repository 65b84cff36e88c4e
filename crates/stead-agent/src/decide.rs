//! The resolving loop's decisions, as a pure function.
//!
//! `decide(observed, intended, now)` looks only at what is true now (the
//! instances this host runs and what the control plane wants) and returns
//! the actions that move the first towards the second. Nothing here touches
//! a process or a socket, so every rule is tested with simulated time; the
//! executor in `lib.rs` applies the actions. Because the input is the whole
//! picture each time (level-triggered), a missed event or an agent restart
//! costs at most one pass, never a wrong state.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use stead_api::IntendedHostState;

/// Milliseconds on the agent's monotonic-ish clock (wall clock in
/// production, simulated in tests).
pub type Millis = i64;

/// What the agent knows about one of its instances.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub id: String,
    pub app: String,
    pub version: u32,
    pub phase: Phase,
    pub started_at: Millis,
    /// `DBOS__VMID` it runs under.
    pub executor_id: String,
    /// Its app's health timeout, overriding the policy's.
    pub unhealthy_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Running, health check not yet passed.
    Starting,
    /// Running and healthy.
    Ready,
    /// Running but failing its health check since the given time.
    Unhealthy { since: Millis },
    /// Being stopped (SIGTERM sent, grace running).
    Stopping,
    /// The process is gone.
    Exited { at: Millis },
}

impl Phase {
    fn is_live(self) -> bool {
        matches!(
            self,
            Phase::Starting | Phase::Ready | Phase::Unhealthy { .. }
        )
    }
}

/// Tunables of the decisions; defaults suit production, tests shrink them.
#[derive(Debug, Clone)]
pub struct Policy {
    /// An instance that has not passed its health check this long after
    /// starting is replaced.
    pub start_timeout: Duration,
    /// An instance failing its health check this long is considered hung.
    pub unhealthy_timeout: Duration,
    /// First delay before restarting an (app, version) whose instances keep
    /// exiting; doubles with each recent exit up to `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// Exits older than this no longer count towards the backoff.
    pub backoff_window: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            start_timeout: Duration::from_secs(60),
            unhealthy_timeout: Duration::from_secs(30),
            base_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(30),
            backoff_window: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start one new instance of `app` at `version`.
    /// Start one new instance, under `executor_id` when it is to take over
    /// a dead instance's identity (and with it, its workflows), else under
    /// its own id.
    Start {
        app: String,
        version: u32,
        executor_id: Option<String>,
    },
    /// Stop the instance gracefully (no new traffic, SIGTERM, grace, SIGKILL).
    Stop { id: String, reason: StopReason },
    /// Drop an exited instance from the table (its exit has been handled).
    Forget { id: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Its version (or app) is no longer intended on this host.
    NotIntended,
    /// More instances than intended.
    ScaleDown,
    /// Never became healthy within the start timeout.
    StartTimeout,
    /// Stopped answering its health check.
    Hung,
    /// Stale: this host was judged dead and what the instance stood for was
    /// placed elsewhere (the control plane fenced it).
    Fenced,
}

impl StopReason {
    pub fn describe(self) -> &'static str {
        match self {
            StopReason::NotIntended => "its version is no longer intended on this host",
            StopReason::ScaleDown => "scaled down",
            StopReason::StartTimeout => "did not pass its health check within the start timeout",
            StopReason::Hung => "stopped answering its health check",
            StopReason::Fenced => "fenced: its host was judged dead and it was replaced elsewhere",
        }
    }
}

/// Recent exits per (app, version), kept by the executor across passes so
/// that a crash-looping version is restarted with backoff rather than in a
/// tight loop.
#[derive(Debug, Default, Clone)]
pub struct ExitHistory {
    exits: HashMap<(String, u32), Vec<Millis>>,
}

impl ExitHistory {
    pub fn record(&mut self, app: &str, version: u32, at: Millis) {
        self.exits
            .entry((app.to_string(), version))
            .or_default()
            .push(at);
    }

    /// Earliest time a new instance of (app, version) may start.
    pub fn next_start_allowed(
        &self,
        app: &str,
        version: u32,
        now: Millis,
        policy: &Policy,
    ) -> Millis {
        let window = policy.backoff_window.as_millis() as i64;
        let Some(list) = self.exits.get(&(app.to_string(), version)) else {
            return now;
        };
        let recent: Vec<Millis> = list.iter().copied().filter(|t| now - t <= window).collect();
        let Some(last) = recent.iter().max().copied() else {
            return now;
        };
        let n = recent.len().min(20) as u32;
        let base = policy.base_backoff.as_millis() as i64;
        let delay = base
            .saturating_mul(1i64 << (n - 1).min(16))
            .min(policy.max_backoff.as_millis() as i64);
        last + delay
    }

    pub fn prune(&mut self, now: Millis, policy: &Policy) {
        let window = policy.backoff_window.as_millis() as i64;
        self.exits.retain(|_, v| {
            v.retain(|t| now - t <= window);
            !v.is_empty()
        });
    }
}

/// The decision: actions that bring `observed` towards `intended`.
pub fn decide(
    observed: &[Observed],
    intended: &IntendedHostState,
    history: &ExitHistory,
    now: Millis,
    policy: &Policy,
) -> Vec<Action> {
    let mut actions = Vec::new();
    let want: BTreeMap<(&str, u32), u32> = intended
        .apps
        .iter()
        .map(|a| ((a.app.as_str(), a.version), a.count))
        .collect();

    // Exited instances: their slot is free again; forget them.
    for o in observed {
        if let Phase::Exited { .. } = o.phase {
            actions.push(Action::Forget { id: o.id.clone() });
        }
    }

    // Fenced instances are stopped first and count for nothing: what they
    // stood for runs elsewhere (or is started anew below, under a new
    // identity, if placement gives this host a share again).
    let mut replaced: Vec<&str> = Vec::new();
    for o in observed {
        if o.phase.is_live() && intended.fenced.iter().any(|f| f == &o.id) {
            actions.push(Action::Stop {
                id: o.id.clone(),
                reason: StopReason::Fenced,
            });
            replaced.push(o.id.as_str());
        }
    }

    // Unhealthy or never-ready instances are stopped; the count below then
    // sees a free slot and starts a replacement in the same pass.
    for o in observed {
        if replaced.contains(&o.id.as_str()) {
            continue;
        }
        let reason = match o.phase {
            Phase::Starting if now - o.started_at >= policy.start_timeout.as_millis() as i64 => {
                Some(StopReason::StartTimeout)
            }
            Phase::Unhealthy { since }
                if now - since
                    >= o.unhealthy_timeout
                        .unwrap_or(policy.unhealthy_timeout)
                        .as_millis() as i64 =>
            {
                Some(StopReason::Hung)
            }
            _ => None,
        };
        if let Some(reason) = reason {
            if want.contains_key(&(o.app.as_str(), o.version)) {
                actions.push(Action::Stop {
                    id: o.id.clone(),
                    reason,
                });
                replaced.push(o.id.as_str());
            }
        }
    }

    // Versions no longer intended here.
    for o in observed {
        if o.phase.is_live()
            && !want.contains_key(&(o.app.as_str(), o.version))
            && !replaced.contains(&o.id.as_str())
        {
            actions.push(Action::Stop {
                id: o.id.clone(),
                reason: StopReason::NotIntended,
            });
        }
    }

    // Counts per intended (app, version).
    for a in &intended.apps {
        let (app, version, count) = (&a.app.as_str(), &a.version, &a.count);
        let mut live: Vec<&Observed> = observed
            .iter()
            .filter(|o| o.app == *app && o.version == *version && o.phase.is_live())
            .filter(|o| !replaced.contains(&o.id.as_str()))
            .collect();
        let n = live.len() as u32;
        if n < *count {
            if history.next_start_allowed(app, *version, now, policy) <= now {
                // Dead executors to take over, unless a live instance already
                // runs under that identity.
                let mut reuse = a.reuse_executor_ids.iter().filter(|e| {
                    !observed.iter().any(|o| {
                        o.phase.is_live()
                            && &o.executor_id == *e
                            && !intended.fenced.contains(&o.id)
                    })
                });
                for _ in n..*count {
                    actions.push(Action::Start {
                        app: app.to_string(),
                        version: *version,
                        executor_id: reuse.next().cloned(),
                    });
                }
            }
        } else if n > *count && !a.draining {
            // Stop the ones that are least useful: not yet ready first, then
            // the newest (the oldest have warm caches and connections).
            live.sort_by_key(|o| {
                (
                    matches!(o.phase, Phase::Ready),
                    std::cmp::Reverse(o.started_at),
                )
            });
            for o in live.iter().take((n - count) as usize) {
                actions.push(Action::Stop {
                    id: o.id.clone(),
                    reason: StopReason::ScaleDown,
                });
            }
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use stead_api::{IntendedApp, RunSpec};

    fn intended(apps: &[(&str, u32, u32)]) -> IntendedHostState {
        IntendedHostState {
            apps: apps
                .iter()
                .map(|(app, version, count)| IntendedApp {
                    app: app.to_string(),
                    app_id: format!("id-{app}"),
                    version: *version,
                    count: *count,
                    artifact_hash: "h".into(),
                    run: RunSpec {
                        start: "x".into(),
                        port: None,
                        health: None,
                        memory_mb: 64,
                        grace_s: 1,
                        language: None,
                        health_timeout_s: 30,
                        admin_port: None,
                        recovery: None,
                    },
                    env: Default::default(),
                    expose: Vec::new(),
                    draining: false,
                    recover_via_admin: Vec::new(),
                    reuse_executor_ids: Vec::new(),
                })
                .collect(),
            fenced: Vec::new(),
        }
    }

    #[test]
    fn fenced_instances_are_stopped_and_replaced_if_still_wanted_here() {
        let observed = vec![
            inst("old", "a", 1, Phase::Ready, 0),
            inst("keep", "b", 1, Phase::Ready, 0),
        ];
        let mut want = intended(&[("a", 1, 1), ("b", 1, 1)]);
        want.fenced = vec!["old".into()];
        let actions = decide(
            &observed,
            &want,
            &ExitHistory::default(),
            10_000,
            &Policy::default(),
        );
        assert_eq!(
            actions,
            vec![
                Action::Stop {
                    id: "old".into(),
                    reason: StopReason::Fenced
                },
                Action::Start {
                    app: "a".into(),
                    version: 1,
                    executor_id: None
                },
            ]
        );
        // Not wanted here any more: stopped once, nothing started.
        let mut want = intended(&[("b", 1, 1)]);
        want.fenced = vec!["old".into()];
        let actions = decide(
            &observed,
            &want,
            &ExitHistory::default(),
            10_000,
            &Policy::default(),
        );
        assert_eq!(
            actions,
            vec![Action::Stop {
                id: "old".into(),
                reason: StopReason::Fenced
            }]
        );
        // An instance already stopping is not stopped again.
        let stopping = vec![
            inst("old", "a", 1, Phase::Stopping, 0),
            inst("keep", "b", 1, Phase::Ready, 0),
        ];
        let actions = decide(
            &stopping,
            &want,
            &ExitHistory::default(),
            10_000,
            &Policy::default(),
        );
        assert!(actions.is_empty(), "{actions:?}");
    }

    fn inst(id: &str, app: &str, version: u32, phase: Phase, started_at: Millis) -> Observed {
        Observed {
            id: id.into(),
            app: app.into(),
            version,
            phase,
            started_at,
            executor_id: id.into(),
            unhealthy_timeout: None,
        }
    }

    fn starts(actions: &[Action]) -> usize {
        actions
            .iter()
            .filter(|a| matches!(a, Action::Start { .. }))
            .count()
    }

    #[test]
    fn starts_missing_instances() {
        let a = decide(
            &[],
            &intended(&[("web", 1, 2)]),
            &ExitHistory::default(),
            0,
            &Policy::default(),
        );
        assert_eq!(
            a,
            vec![
                Action::Start {
                    app: "web".into(),
                    version: 1,
                    executor_id: None
                },
                Action::Start {
                    app: "web".into(),
                    version: 1,
                    executor_id: None
                }
            ]
        );
    }

    #[test]
    fn steady_state_does_nothing() {
        let obs = vec![
            inst("a", "web", 1, Phase::Ready, 0),
            inst("b", "web", 1, Phase::Starting, 5),
        ];
        let a = decide(
            &obs,
            &intended(&[("web", 1, 2)]),
            &ExitHistory::default(),
            10,
            &Policy::default(),
        );
        assert!(a.is_empty(), "{a:?}");
    }

    #[test]
    fn exited_instance_is_forgotten_and_replaced() {
        let obs = vec![inst("a", "web", 1, Phase::Exited { at: 100 }, 0)];
        let mut h = ExitHistory::default();
        h.record("web", 1, 100);
        let p = Policy::default();
        // Within the first backoff: forget only.
        let a = decide(&obs, &intended(&[("web", 1, 1)]), &h, 200, &p);
        assert_eq!(a, vec![Action::Forget { id: "a".into() }]);
        // After it: replace.
        let a = decide(&obs, &intended(&[("web", 1, 1)]), &h, 100 + 250, &p);
        assert_eq!(starts(&a), 1);
    }

    #[test]
    fn crash_loop_backs_off_exponentially_and_caps() {
        let p = Policy::default();
        let mut h = ExitHistory::default();
        for (i, t) in [0i64, 1000, 2000, 3000].iter().enumerate() {
            h.record("web", 1, *t);
            let next = h.next_start_allowed("web", 1, *t, &p);
            assert_eq!(next - t, 250 * (1 << i), "exit #{i}");
        }
        for t in 4..40 {
            h.record("web", 1, t * 1000);
        }
        assert_eq!(h.next_start_allowed("web", 1, 39_000, &p), 39_000 + 30_000);
        // Old exits stop counting.
        h.prune(39_000 + 200_000, &p);
        assert_eq!(h.next_start_allowed("web", 1, 239_000, &p), 239_000);
    }

    #[test]
    fn old_versions_are_stopped_when_no_longer_intended() {
        let obs = vec![
            inst("old", "web", 1, Phase::Ready, 0),
            inst("new", "web", 2, Phase::Ready, 0),
        ];
        let a = decide(
            &obs,
            &intended(&[("web", 2, 1)]),
            &ExitHistory::default(),
            10,
            &Policy::default(),
        );
        assert_eq!(
            a,
            vec![Action::Stop {
                id: "old".into(),
                reason: StopReason::NotIntended
            }]
        );
    }

    #[test]
    fn both_versions_run_while_both_intended() {
        let obs = vec![inst("old", "web", 1, Phase::Ready, 0)];
        let a = decide(
            &obs,
            &intended(&[("web", 1, 1), ("web", 2, 1)]),
            &ExitHistory::default(),
            10,
            &Policy::default(),
        );
        assert_eq!(
            a,
            vec![Action::Start {
                app: "web".into(),
                version: 2,
                executor_id: None
            }]
        );
    }

    #[test]
    fn deleted_app_is_stopped_and_stopping_is_left_alone() {
        let obs = vec![
            inst("a", "gone", 1, Phase::Ready, 0),
            inst("b", "gone", 1, Phase::Stopping, 0),
        ];
        let a = decide(
            &obs,
            &intended(&[]),
            &ExitHistory::default(),
            10,
            &Policy::default(),
        );
        assert_eq!(
            a,
            vec![Action::Stop {
                id: "a".into(),
                reason: StopReason::NotIntended
            }]
        );
    }

    #[test]
    fn scale_down_prefers_unready_then_newest() {
        let obs = vec![
            inst("old", "web", 1, Phase::Ready, 0),
            inst("mid", "web", 1, Phase::Ready, 10),
            inst("new", "web", 1, Phase::Ready, 20),
            inst("cold", "web", 1, Phase::Starting, 5),
        ];
        let a = decide(
            &obs,
            &intended(&[("web", 1, 2)]),
            &ExitHistory::default(),
            30,
            &Policy::default(),
        );
        assert_eq!(
            a,
            vec![
                Action::Stop {
                    id: "cold".into(),
                    reason: StopReason::ScaleDown
                },
                Action::Stop {
                    id: "new".into(),
                    reason: StopReason::ScaleDown
                }
            ]
        );
    }

    #[test]
    fn start_timeout_and_hung_instances_are_replaced() {
        let p = Policy::default();
        let obs = vec![
            inst("slow", "web", 1, Phase::Starting, 0),
            inst("hung", "web", 1, Phase::Unhealthy { since: 1_000 }, 0),
        ];
        let want = intended(&[("web", 1, 2)]);
        // Before the timeouts: nothing.
        assert!(decide(&obs, &want, &ExitHistory::default(), 20_000, &p).is_empty());
        let a = decide(&obs, &want, &ExitHistory::default(), 61_000, &p);
        assert!(a.contains(&Action::Stop {
            id: "slow".into(),
            reason: StopReason::StartTimeout
        }));
        assert!(a.contains(&Action::Stop {
            id: "hung".into(),
            reason: StopReason::Hung
        }));
        assert_eq!(starts(&a), 2, "{a:?}");
    }

    #[test]
    fn stopping_instances_do_not_count_as_live() {
        let obs = vec![inst("s", "web", 1, Phase::Stopping, 0)];
        let a = decide(
            &obs,
            &intended(&[("web", 1, 1)]),
            &ExitHistory::default(),
            10,
            &Policy::default(),
        );
        assert_eq!(starts(&a), 1);
    }
}

#[cfg(test)]
mod dbos_tests {
    use super::*;
    use stead_api::{IntendedApp, RunSpec};

    fn app(version: u32, count: u32) -> IntendedApp {
        IntendedApp {
            app: "wf".into(),
            app_id: "1".into(),
            version,
            count,
            artifact_hash: "h".into(),
            run: RunSpec {
                start: "x".into(),
                port: None,
                health: None,
                memory_mb: 64,
                grace_s: 1,
                language: None,
                health_timeout_s: 5,
                admin_port: None,
                recovery: None,
            },
            env: Default::default(),
            expose: Vec::new(),
            draining: false,
            recover_via_admin: Vec::new(),
            reuse_executor_ids: Vec::new(),
        }
    }

    fn obs(id: &str, version: u32, phase: Phase, executor: &str) -> Observed {
        Observed {
            id: id.into(),
            app: "wf".into(),
            version,
            phase,
            started_at: 0,
            executor_id: executor.into(),
            unhealthy_timeout: Some(Duration::from_secs(5)),
        }
    }

    #[test]
    fn replacement_takes_over_the_dead_executor_id() {
        let mut a = app(1, 2);
        a.reuse_executor_ids = vec!["dead-1".into(), "live-1".into()];
        let observed = vec![obs("x", 1, Phase::Ready, "live-1")];
        let want = IntendedHostState {
            apps: vec![a],
            fenced: Vec::new(),
        };
        let actions = decide(
            &observed,
            &want,
            &ExitHistory::default(),
            0,
            &Policy::default(),
        );
        assert_eq!(
            actions,
            vec![Action::Start {
                app: "wf".into(),
                version: 1,
                executor_id: Some("dead-1".into())
            }]
        );
    }

    #[test]
    fn draining_versions_keep_their_instances() {
        let mut old = app(1, 1);
        old.draining = true;
        let observed = vec![
            obs("a", 1, Phase::Ready, "a"),
            obs("b", 1, Phase::Ready, "b"),
            obs("c", 2, Phase::Ready, "c"),
        ];
        let want = IntendedHostState {
            apps: vec![old, app(2, 1)],
            fenced: Vec::new(),
        };
        let actions = decide(
            &observed,
            &want,
            &ExitHistory::default(),
            0,
            &Policy::default(),
        );
        assert!(actions.is_empty(), "{actions:?}");
    }

    #[test]
    fn per_app_health_timeout_applies() {
        let observed = vec![obs("a", 1, Phase::Unhealthy { since: 0 }, "a")];
        let want = IntendedHostState {
            apps: vec![app(1, 1)],
            fenced: Vec::new(),
        };
        let p = Policy::default();
        assert!(decide(&observed, &want, &ExitHistory::default(), 4_000, &p).is_empty());
        let actions = decide(&observed, &want, &ExitHistory::default(), 5_000, &p);
        assert!(
            actions.contains(&Action::Stop {
                id: "a".into(),
                reason: StopReason::Hung
            }),
            "{actions:?}"
        );
    }
}
