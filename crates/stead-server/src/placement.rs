//! Where instances run: a pure function of the hosts (capacity, backends,
//! draining), what already runs where and what each app version wants, so
//! that every replica of the control plane computes the same placement from
//! the same database, and a heartbeat or a host joining moves nothing.
//!
//! Rules, in order:
//! * **stability**: an instance that runs on a host that is alive, not
//!   draining and offers its backend stays there; only a surplus (scale
//!   down) is removed, from the hosts with the most instances of the
//!   version (spread is restored as a side effect);
//! * **spread, then free memory**: each new instance goes to the eligible
//!   host with the fewest instances of that version, then the most free
//!   memory, then the smallest id (ties are broken the same on every
//!   replica);
//! * **full or draining hosts get nothing new**: a host whose free memory
//!   is below the instance's `memory_mb` is skipped; a draining host keeps
//!   its instances only until as many replacements are ready elsewhere, so
//!   that requests never lack a ready instance;
//! * **nothing is dropped silently**: what cannot be placed is returned in
//!   [`Placement::unplaced`] with the reason, for the log and the app's
//!   events.

use std::collections::BTreeMap;

/// Instances an app should have before autoscaling exists: at least one
/// (there is no scale-to-zero yet), at most `max`.
pub fn desired_count(min: u32, max: u32) -> u32 {
    min.max(1).min(max.max(1))
}

/// An app version: `(app_id, version)`.
pub type Key = (i64, u32);

/// An alive host as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostView {
    pub id: String,
    pub memory_mb: u64,
    /// Sandbox backends it offers; empty means an old agent that only knows
    /// the process backend.
    pub backends: Vec<String>,
    pub draining: bool,
}

impl HostView {
    fn offers(&self, backend: &str) -> bool {
        self.backends.iter().any(|b| b == backend)
            || (self.backends.is_empty() && backend == "process")
    }
}

/// What an app version wants.
#[derive(Debug, Clone, PartialEq)]
pub struct Demand {
    pub key: Key,
    pub desired: u32,
    pub memory_mb: u64,
    /// `sandbox` of its stead.toml (`None`: the process backend).
    pub sandbox: Option<String>,
}

/// An instance that runs now (not exited, not fenced) on an alive host.
#[derive(Debug, Clone, PartialEq)]
pub struct Running {
    pub key: Key,
    pub host_id: String,
    pub memory_mb: u64,
    pub ready: bool,
}

/// The answer: per version, instances per host (hosts with none are left
/// out), and what could not be placed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Placement {
    pub counts: BTreeMap<Key, BTreeMap<String, u32>>,
    pub unplaced: BTreeMap<Key, Unplaced>,
}

impl Placement {
    /// Instances of `key` on `host`.
    pub fn count(&self, key: Key, host: &str) -> u32 {
        self.counts
            .get(&key)
            .and_then(|m| m.get(host))
            .copied()
            .unwrap_or(0)
    }
}

/// Instances of a version that have no host, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaced {
    pub count: u32,
    pub reason: String,
}

/// Places every demand; see the module documentation for the rules.
pub fn place(hosts: &[HostView], demands: &[Demand], running: &[Running]) -> Placement {
    let mut hosts: Vec<&HostView> = hosts.iter().collect();
    hosts.sort_by(|a, b| a.id.cmp(&b.id));
    // Memory committed to what runs, on every host (all versions, also
    // those not in `demands`, e.g. old versions draining their workflows).
    let mut committed: BTreeMap<&str, u64> = BTreeMap::new();
    for r in running {
        *committed.entry(r.host_id.as_str()).or_default() += r.memory_mb;
    }
    let free = |committed: &BTreeMap<&str, u64>, h: &HostView| {
        h.memory_mb
            .saturating_sub(committed.get(h.id.as_str()).copied().unwrap_or(0))
    };
    let mut demands: Vec<&Demand> = demands.iter().collect();
    demands.sort_by_key(|d| d.key);
    // Instances by version, so placing each demand looks only at its own
    // (10,000 versions over 50,000 instances would otherwise be 5e8 steps).
    let mut by_key: BTreeMap<Key, Vec<&Running>> = BTreeMap::new();
    for r in running {
        by_key.entry(r.key).or_default().push(r);
    }
    let mut out = Placement::default();
    for d in demands {
        let backend = d.sandbox.as_deref().unwrap_or("process");
        let eligible: Vec<&HostView> = hosts
            .iter()
            .copied()
            .filter(|h| h.offers(backend))
            .collect();
        let mut here: BTreeMap<&str, u32> = BTreeMap::new();
        let mut ready_on: BTreeMap<&str, u32> = BTreeMap::new();
        for r in by_key.get(&d.key).into_iter().flatten() {
            if let Some(h) = eligible.iter().find(|h| h.id == r.host_id) {
                *here.entry(h.id.as_str()).or_default() += 1;
                if r.ready {
                    *ready_on.entry(h.id.as_str()).or_default() += 1;
                }
            }
        }
        // Kept where they run, on hosts that are not draining.
        let mut counts: BTreeMap<&str, u32> = eligible
            .iter()
            .filter(|h| !h.draining)
            .filter_map(|h| here.get(h.id.as_str()).map(|&n| (h.id.as_str(), n)))
            .collect();
        // Surplus leaves the host with the most, largest id first.
        let mut total: u32 = counts.values().sum();
        while total > d.desired {
            let Some((&h, _)) = counts.iter().max_by(|a, b| a.1.cmp(b.1).then(a.0.cmp(b.0))) else {
                break;
            };
            if let Some(n) = counts.get_mut(h) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(h);
                }
            }
            if let Some(c) = committed.get_mut(h) {
                *c = c.saturating_sub(d.memory_mb);
            }
            total -= 1;
        }
        // New instances: fewest of this version, most free memory, id.
        let mut missing = 0;
        while total < d.desired {
            let best = eligible
                .iter()
                .filter(|h| !h.draining && free(&committed, h) >= d.memory_mb)
                .min_by(|a, b| {
                    let (ca, cb) = (
                        counts.get(a.id.as_str()).copied().unwrap_or(0),
                        counts.get(b.id.as_str()).copied().unwrap_or(0),
                    );
                    ca.cmp(&cb)
                        .then(free(&committed, b).cmp(&free(&committed, a)))
                        .then(a.id.cmp(&b.id))
                });
            match best {
                Some(h) => {
                    *counts.entry(h.id.as_str()).or_default() += 1;
                    *committed.entry(h.id.as_str()).or_default() += d.memory_mb;
                }
                None => missing += 1,
            }
            total += 1;
        }
        if missing > 0 {
            let reason = if eligible.is_empty() {
                format!("no alive host offers the {backend} sandbox backend")
            } else if eligible.iter().all(|h| h.draining) {
                "every alive host that could run it is draining".to_string()
            } else {
                format!(
                    "no alive, non-draining host has {} MiB free (most free: {} MiB)",
                    d.memory_mb,
                    eligible
                        .iter()
                        .filter(|h| !h.draining)
                        .map(|h| free(&committed, h))
                        .max()
                        .unwrap_or(0)
                )
            };
            out.unplaced.insert(
                d.key,
                Unplaced {
                    count: missing,
                    reason,
                },
            );
        }
        // Draining hosts keep what runs there until enough replacements
        // are ready elsewhere (first host by id keeps first).
        let ready_elsewhere: u32 = counts
            .keys()
            .map(|h| ready_on.get(h).copied().unwrap_or(0))
            .sum();
        let mut still_needed = d.desired.saturating_sub(ready_elsewhere);
        for h in eligible.iter().filter(|h| h.draining) {
            let keep = here
                .get(h.id.as_str())
                .copied()
                .unwrap_or(0)
                .min(still_needed);
            if keep > 0 {
                counts.insert(h.id.as_str(), keep);
                still_needed -= keep;
            }
        }
        if !counts.is_empty() {
            out.counts.insert(
                d.key,
                counts
                    .into_iter()
                    .map(|(h, n)| (h.to_string(), n))
                    .collect(),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, mem: u64) -> HostView {
        HostView {
            id: id.into(),
            memory_mb: mem,
            backends: vec!["process".into()],
            draining: false,
        }
    }
    fn demand(app: i64, desired: u32, mem: u64) -> Demand {
        Demand {
            key: (app, 1),
            desired,
            memory_mb: mem,
            sandbox: None,
        }
    }
    fn run(app: i64, host: &str, mem: u64, ready: bool) -> Running {
        Running {
            key: (app, 1),
            host_id: host.into(),
            memory_mb: mem,
            ready,
        }
    }
    fn counts(p: &Placement, key: Key) -> Vec<(String, u32)> {
        p.counts
            .get(&key)
            .map(|m| m.iter().map(|(h, n)| (h.clone(), *n)).collect())
            .unwrap_or_default()
    }

    #[test]
    fn desired_is_clamped() {
        assert_eq!(desired_count(0, 4), 1);
        assert_eq!(desired_count(2, 4), 2);
        assert_eq!(desired_count(5, 3), 3);
        assert_eq!(desired_count(0, 0), 1);
    }

    #[test]
    fn new_instances_go_to_the_most_free_memory_and_spread() {
        let hosts = [host("a", 1000), host("b", 4000), host("c", 2000)];
        // A single instance: the host with most free memory, not the first id.
        let p = place(&hosts, &[demand(1, 1, 256)], &[]);
        assert_eq!(counts(&p, (1, 1)), vec![("b".into(), 1)]);
        // Three: one on each (spread beats free memory).
        let p = place(&hosts, &[demand(1, 3, 256)], &[]);
        assert_eq!(
            counts(&p, (1, 1)),
            vec![("a".into(), 1), ("b".into(), 1), ("c".into(), 1)]
        );
        // Memory already committed on b (another app) moves the choice to c.
        let p = place(&hosts, &[demand(1, 1, 256)], &[run(9, "b", 3500, true)]);
        assert_eq!(counts(&p, (1, 1)), vec![("c".into(), 1)]);
        assert!(p.unplaced.is_empty());
    }

    #[test]
    fn running_instances_stay_when_a_host_joins() {
        let running = [run(1, "b", 256, true), run(1, "b", 256, true)];
        let before = place(&[host("b", 4000)], &[demand(1, 2, 256)], &running);
        assert_eq!(counts(&before, (1, 1)), vec![("b".into(), 2)]);
        // A new, emptier host joins: nothing moves.
        let after = place(
            &[host("a", 64000), host("b", 4000)],
            &[demand(1, 2, 256)],
            &running,
        );
        assert_eq!(counts(&after, (1, 1)), vec![("b".into(), 2)]);
        // A third instance goes to the new host (spread).
        let more = place(
            &[host("a", 64000), host("b", 4000)],
            &[demand(1, 3, 256)],
            &running,
        );
        assert_eq!(
            counts(&more, (1, 1)),
            vec![("a".into(), 1), ("b".into(), 2)]
        );
    }

    #[test]
    fn scale_down_removes_from_the_most_loaded_host() {
        let hosts = [host("a", 4000), host("b", 4000)];
        let running = [
            run(1, "a", 256, true),
            run(1, "b", 256, true),
            run(1, "b", 256, true),
        ];
        let p = place(&hosts, &[demand(1, 2, 256)], &running);
        assert_eq!(counts(&p, (1, 1)), vec![("a".into(), 1), ("b".into(), 1)]);
        let p = place(&hosts, &[demand(1, 0, 256)], &running);
        assert!(counts(&p, (1, 1)).is_empty());
    }

    #[test]
    fn full_hosts_get_nothing_and_the_reason_is_given() {
        let hosts = [host("a", 300), host("b", 300)];
        let p = place(&hosts, &[demand(1, 3, 256)], &[]);
        assert_eq!(counts(&p, (1, 1)), vec![("a".into(), 1), ("b".into(), 1)]);
        let u = &p.unplaced[&(1, 1)];
        assert_eq!(u.count, 1);
        assert!(u.reason.contains("256 MiB free"), "{}", u.reason);
        // Existing instances are kept even on a host over-committed since.
        let p = place(
            &[host("a", 100)],
            &[demand(1, 1, 256)],
            &[run(1, "a", 256, true)],
        );
        assert_eq!(counts(&p, (1, 1)), vec![("a".into(), 1)]);
        assert!(p.unplaced.is_empty());
    }

    #[test]
    fn a_draining_host_keeps_its_instance_until_the_replacement_is_ready() {
        let mut a = host("a", 4000);
        a.draining = true;
        let hosts = [a, host("b", 1000)];
        // Nothing elsewhere yet: a replacement goes to b, a keeps its one.
        let p = place(&hosts, &[demand(1, 1, 256)], &[run(1, "a", 256, true)]);
        assert_eq!(counts(&p, (1, 1)), vec![("a".into(), 1), ("b".into(), 1)]);
        // The replacement starts (not ready): still both.
        let starting = [run(1, "a", 256, true), run(1, "b", 256, false)];
        let p = place(&hosts, &[demand(1, 1, 256)], &starting);
        assert_eq!(counts(&p, (1, 1)), vec![("a".into(), 1), ("b".into(), 1)]);
        // Ready: a's instance leaves.
        let ready = [run(1, "a", 256, true), run(1, "b", 256, true)];
        let p = place(&hosts, &[demand(1, 1, 256)], &ready);
        assert_eq!(counts(&p, (1, 1)), vec![("b".into(), 1)]);
        // With every host draining nothing new is placed, and that is said.
        let mut b = host("b", 1000);
        b.draining = true;
        let mut a = host("a", 4000);
        a.draining = true;
        let p = place(&[a, b], &[demand(1, 1, 256)], &[run(1, "a", 256, true)]);
        assert_eq!(counts(&p, (1, 1)), vec![("a".into(), 1)]);
        assert!(p.unplaced[&(1, 1)].reason.contains("draining"));
    }

    #[test]
    fn backends_are_respected() {
        let mut g = host("g", 1000);
        g.backends = vec!["process".into(), "gvisor".into()];
        let mut old = host("o", 64000);
        old.backends = vec![];
        let mut d = demand(1, 2, 256);
        d.sandbox = Some("gvisor".into());
        let p = place(&[g.clone(), old.clone()], &[d.clone()], &[]);
        assert_eq!(counts(&p, (1, 1)), vec![("g".into(), 2)]);
        // An empty backend list means the process backend.
        let p = place(&[g, old], &[demand(2, 1, 256)], &[]);
        assert_eq!(counts(&p, (2, 1)), vec![("o".into(), 1)]);
        d.sandbox = Some("firecracker".into());
        let p = place(&[host("a", 1000)], &[d], &[]);
        assert!(p.unplaced[&(1, 1)].reason.contains("firecracker"));
    }

    #[test]
    fn deterministic_whatever_the_input_order() {
        let hosts = [host("a", 2000), host("b", 2000), host("c", 2000)];
        let demands = [demand(1, 4, 256), demand(2, 2, 512), demand(3, 5, 128)];
        let running = [run(1, "c", 256, true), run(3, "a", 128, false)];
        let p = place(&hosts, &demands, &running);
        let mut rh = hosts.to_vec();
        rh.reverse();
        let mut rd = demands.to_vec();
        rd.reverse();
        let mut rr = running.to_vec();
        rr.reverse();
        assert_eq!(p, place(&rh, &rd, &rr));
        for d in &demands {
            let placed: u32 = p.counts[&d.key].values().sum();
            assert_eq!(placed, d.desired);
        }
        // Equal hosts, equal load: ties go to the smallest id.
        let p = place(&hosts, &[demand(7, 1, 100)], &[]);
        assert_eq!(counts(&p, (7, 1)), vec![("a".into(), 1)]);
    }
}
