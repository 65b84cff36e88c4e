//! The autoscaler: how many instances of its active version an app should
//! run, as a pure function of the demand observed and the clock.
//!
//! It follows Knative's model. Demand is requests in flight at the routers
//! (including requests held while the app wakes), plus DBOS workflows that
//! are ENQUEUED or PENDING (each counts as one request in flight), and CPU:
//!
//! * the **stable** value is the demand averaged over the stable window
//!   (default 60 s): `ceil(demand / target_concurrency)` instances, or
//!   `ceil(cpu / target_cpu)` if more;
//! * the **panic** value is the same over a short window (default 6 s), or
//!   over the last second if that is higher (bursts are acted on at once).
//!   When it asks for at least twice the ready instances, the app is in
//!   panic mode for a stable window: it scales up to the panic value at
//!   once and never scales down meanwhile;
//! * scaling **down** waits until the wish for fewer instances has lasted
//!   the scale-down delay (default 30 s), then goes to the highest count
//!   wished for during that delay, so a flapping demand does not flap the
//!   instances;
//! * with `min = 0`, an app with no request, no held request and no queued
//!   workflow for its idle timeout (default 5 min) goes to zero at once;
//!   otherwise at least one instance runs.
//!
//! Nothing here reads a clock or a database: the caller passes the samples,
//! the previous [`State`] and `now`, and persists the new state, so every
//! control-plane replica reaches the same decision and the behaviour is
//! tested with simulated time.

use stead_api::config::{fmt_ms, ScalingConfig};

/// Milliseconds since the epoch (simulated in tests).
pub type Millis = i64;

/// A burst asking for this many times the ready instances enters panic mode.
pub const PANIC_THRESHOLD: f64 = 2.0;
/// The burst value also looks at this last stretch (about one router
/// report), so a burst is acted on within a second even after steady
/// traffic would dilute it over the whole panic window.
pub const BURST_FLOOR_WINDOW: Millis = 1_000;
/// A source's latest sample that showed demand and ended this recently is
/// assumed to go on: its next report is simply not in yet (routers report
/// about once a second while busy), so the gap is not averaged as zero.
pub const REPORT_GRACE: Millis = 2_500;

/// An app's scaling settings, normalised.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub min: u32,
    pub max: u32,
    /// Requests in flight per instance to aim at.
    pub target_concurrency: f64,
    /// Cores per instance to aim at; `None` ignores CPU.
    pub target_cpu: Option<f64>,
    pub stable_window: Millis,
    pub panic_window: Millis,
    pub scale_down_delay: Millis,
    /// 0: never scale to zero.
    pub idle_timeout: Millis,
}

impl Settings {
    pub fn new(min: u32, max: u32, c: &ScalingConfig) -> Self {
        let ms = |v: u64| Millis::try_from(v).unwrap_or(Millis::MAX / 4);
        Settings {
            min,
            max: max.max(1).max(min),
            target_concurrency: f64::from(c.target_concurrency.max(1)),
            target_cpu: (c.target_cpu_percent > 0).then(|| f64::from(c.target_cpu_percent) / 100.0),
            stable_window: ms(c.stable_window_ms).max(1),
            panic_window: ms(c.panic_window_ms).max(1),
            scale_down_delay: ms(c.scale_down_delay_ms),
            idle_timeout: ms(c.idle_timeout_ms),
        }
    }
}

/// A measurement over `[start, end]`: e.g. the average requests in flight
/// one router saw, or the cores one host's instances used.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub start: Millis,
    pub end: Millis,
    pub value: f64,
}

/// What is known about an app's demand now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Signals {
    /// Average requests in flight, per router and period.
    pub concurrency: Vec<Sample>,
    /// Requests received, per router and period (`value` is a count).
    pub requests: Vec<Sample>,
    /// Cores used by the app's instances, per host and period.
    pub cpu: Vec<Sample>,
    /// Requests held right now by routers because no instance is ready.
    pub waiting: u64,
    /// DBOS workflows ENQUEUED or PENDING.
    pub queued_workflows: u64,
    /// When the app last had a request in flight (or was deployed).
    pub last_activity: Option<Millis>,
    /// Ready instances of the active version.
    pub ready: u32,
}

/// What the autoscaler remembers between decisions (persisted by the caller).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    /// Instances the app should run.
    pub desired: u32,
    /// Panic mode lasts until then.
    pub panic_until: Option<Millis>,
    /// Since when fewer instances than `desired` have been wished for.
    pub below_since: Option<Millis>,
    /// The most instances wished for since `below_since`.
    pub below_peak: u32,
}

/// Why the count is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// Requests in flight (and queued workflows) over the stable window.
    Concurrency,
    /// A burst over the panic window.
    Panic,
    /// Recent demand (over the panic window) still needs the instances.
    Burst,
    /// CPU use over the stable window.
    Cpu,
    /// Requests held while the app wakes from zero.
    Waking,
    /// The configured minimum.
    Min,
    /// Not idle long enough to scale to zero.
    KeepOne,
    /// Idle for the idle timeout: scaled to the minimum (zero).
    Idle,
    /// Capped at the configured maximum.
    Max,
    /// Fewer instances are wished for, but not yet for the scale-down delay.
    Holding,
}

/// The decision and what it was based on.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub state: State,
    pub driver: Driver,
    /// Instances wished for before the scale-down delay.
    pub wanted: u32,
    /// Requests in flight (averaged) over the stable and the panic window.
    pub stable: f64,
    pub burst: f64,
    pub requests_per_s: f64,
    pub cpu: f64,
    pub idle_for: Option<Millis>,
    pub reason: String,
}

impl Decision {
    pub fn panic(&self, now: Millis) -> bool {
        self.state.panic_until.is_some_and(|t| t > now)
    }
}

/// Instances for `demand` at `per_instance` each, rounding up, with a
/// tolerance so that float noise (100.0000001 / 100) does not add one.
fn units(demand: f64, per_instance: f64) -> u32 {
    if demand.is_nan() || demand <= 0.0 || per_instance.is_nan() || per_instance <= 0.0 {
        return 0;
    }
    let n = (demand / per_instance - 1e-6).ceil();
    if n >= f64::from(u32::MAX / 2) {
        u32::MAX / 2
    } else {
        n.max(0.0) as u32
    }
}

/// The time-weighted average of `samples` over `[now - window, now]`,
/// counted from the first sample in the window (an app that just got busy
/// is not diluted by the time before), and not counting the gap after a
/// busy source's last report when that report is recent.
pub fn window_average(samples: &[Sample], now: Millis, window: Millis) -> f64 {
    let (area, span) = window_area(samples, now, window);
    if span <= 0 {
        0.0
    } else {
        area / span as f64
    }
}

/// The sum of `value × duration` inside the window, and the time it covers.
fn window_area(samples: &[Sample], now: Millis, window: Millis) -> (f64, Millis) {
    let from = now - window;
    let mut area = 0.0;
    let mut earliest: Option<Millis> = None;
    let mut latest: Option<(Millis, bool)> = None;
    for s in samples {
        if s.end < from || s.start > now {
            continue;
        }
        let a = s.start.max(from);
        let b = s.end.min(now);
        if b > a {
            area += s.value * (b - a) as f64;
        }
        earliest = Some(earliest.map_or(a, |e| e.min(a)));
        if latest.is_none_or(|(e, _)| s.end >= e) {
            latest = Some((s.end, s.value > 0.0));
        }
    }
    let Some(earliest) = earliest else {
        return (0.0, 0);
    };
    let end = match latest {
        Some((e, true)) if now - e <= REPORT_GRACE => e.min(now),
        _ => now,
    };
    (area, end - earliest)
}

/// Requests per second over the window (samples hold counts).
fn window_rate(samples: &[Sample], now: Millis, window: Millis) -> f64 {
    let from = now - window;
    let mut count = 0.0;
    let mut earliest: Option<Millis> = None;
    for s in samples {
        if s.end < from || s.end > now {
            continue;
        }
        count += s.value;
        earliest = Some(earliest.map_or(s.start, |e| e.min(s.start)).max(from));
    }
    match earliest {
        Some(e) if now > e => count * 1000.0 / (now - e) as f64,
        _ => 0.0,
    }
}

fn instances(n: u32) -> String {
    if n == 1 {
        "1 instance".into()
    } else {
        format!("{n} instances")
    }
}

fn fmt_num(v: f64) -> String {
    if v >= 10.0 || v == v.round() {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn fmt_dur(ms: Millis) -> String {
    fmt_ms(u64::try_from(ms.max(0)).unwrap_or(0))
}

/// The decision for one app at `now`, given the previous state (`None` for
/// an app never decided on: it starts at its minimum, at least one).
pub fn decide(
    settings: &Settings,
    signals: &Signals,
    prev: Option<&State>,
    now: Millis,
) -> Decision {
    let s = settings;
    let stable = window_average(&signals.concurrency, now, s.stable_window);
    let burst = window_average(&signals.concurrency, now, s.panic_window).max(window_average(
        &signals.concurrency,
        now,
        s.panic_window.min(BURST_FLOOR_WINDOW),
    ));
    let cpu = window_average(&signals.cpu, now, s.stable_window);
    let requests_per_s = window_rate(&signals.requests, now, s.stable_window);
    let queued = signals.queued_workflows as f64;
    let waiting = signals.waiting as f64;

    let by_concurrency = units(stable + queued, s.target_concurrency);
    let by_burst = units((burst + queued).max(waiting), s.target_concurrency);
    let by_cpu = s.target_cpu.map_or(0, |t| units(cpu, t));
    // Bounds changed by the user apply at once, without the scale-down delay.
    let current = prev
        .map_or_else(|| s.min.max(1), |p| p.desired)
        .clamp(s.min, s.max);

    let mut panic_until = prev.and_then(|p| p.panic_until).filter(|t| *t > now);
    let ready = f64::from(signals.ready.max(1));
    if by_burst > current && f64::from(by_burst) >= PANIC_THRESHOLD * ready {
        panic_until = Some(now + s.stable_window);
    }
    let in_panic = panic_until.is_some();

    let mut want = by_concurrency.max(by_cpu);
    let mut driver = if by_cpu > by_concurrency {
        Driver::Cpu
    } else {
        Driver::Concurrency
    };
    if in_panic && by_burst.max(current) > want {
        want = by_burst.max(current);
        driver = Driver::Panic;
    }
    if signals.waiting > 0 && (by_burst.max(1) > want || signals.ready == 0) {
        want = want.max(by_burst).max(1);
        driver = Driver::Waking;
    }

    let idle_for = signals.last_activity.map(|t| (now - t).max(0));
    let idle = s.idle_timeout > 0
        && signals.queued_workflows == 0
        && signals.waiting == 0
        && burst <= 0.0
        && idle_for.is_none_or(|d| d >= s.idle_timeout);
    let wanted = if idle {
        driver = Driver::Idle;
        s.min
    } else {
        let floor = s.min.max(1);
        if want < floor {
            driver = if s.min >= 1 {
                Driver::Min
            } else {
                Driver::KeepOne
            };
        }
        if want.max(floor) > s.max {
            driver = Driver::Max;
        }
        want.max(floor).min(s.max)
    };

    let mut state = State {
        desired: wanted,
        panic_until,
        below_since: None,
        below_peak: 0,
    };
    if wanted < current && !idle {
        // What recent demand needs counts too: instances a burst a few
        // seconds ago used are not removed between two bursts.
        let wish = wanted.max(by_burst.min(s.max));
        if wish >= current {
            state.desired = current;
            driver = Driver::Burst;
        } else {
            let (since, peak) = match prev.and_then(|p| p.below_since.map(|t| (t, p.below_peak))) {
                Some((t, p)) => (t, p.max(wish)),
                None => (now, wish),
            };
            if now - since >= s.scale_down_delay {
                state.desired = peak;
            } else {
                state.desired = current;
                state.below_since = Some(since);
                state.below_peak = peak;
                driver = Driver::Holding;
            }
        }
    }

    let n = state.desired;
    let target = fmt_num(s.target_concurrency);
    let reason = match driver {
        Driver::Concurrency if queued > 0.0 => format!(
            "{}: {} in-flight + {} queued workflows / target {target}",
            instances(n),
            fmt_num(stable),
            signals.queued_workflows
        ),
        Driver::Concurrency => format!("{}: {} in-flight / target {target}", instances(n), fmt_num(stable)),
        Driver::Panic => format!(
            "{}: burst of {} in-flight over {} / target {target} (panic mode: no scale-down until it passes)",
            instances(n),
            fmt_num(burst + queued),
            fmt_dur(s.panic_window)
        ),
        Driver::Burst => format!(
            "{}: {} in-flight over the last {} / target {target}",
            instances(n),
            fmt_num(burst + queued),
            fmt_dur(s.panic_window)
        ),
        Driver::Cpu => format!(
            "{}: CPU {:.2} cores / target {:.2} per instance",
            instances(n),
            cpu,
            s.target_cpu.unwrap_or(0.0)
        ),
        Driver::Waking => format!(
            "{}: waking for {} held request(s)",
            instances(n),
            signals.waiting
        ),
        Driver::Min => format!("{}: minimum {} ({} in-flight)", instances(n), s.min, fmt_num(stable)),
        Driver::KeepOne if s.idle_timeout == 0 => {
            format!("{}: {} in-flight; scaling to zero is disabled", instances(n), fmt_num(stable))
        }
        Driver::KeepOne if signals.queued_workflows > 0 => format!(
            "{}: {} queued workflows keep it up",
            instances(n),
            signals.queued_workflows
        ),
        Driver::KeepOne => format!(
            "{}: {} in-flight; scales to zero after {} idle ({} left)",
            instances(n),
            fmt_num(stable),
            fmt_dur(s.idle_timeout),
            fmt_dur(s.idle_timeout - idle_for.unwrap_or(0))
        ),
        Driver::Idle => format!(
            "{}: idle for {} (idle timeout {})",
            instances(n),
            idle_for.map_or_else(|| "ever".to_string(), fmt_dur),
            fmt_dur(s.idle_timeout)
        ),
        Driver::Max => format!(
            "{}: at max {} ({} wanted for {} in-flight / target {target})",
            instances(n),
            s.max,
            want,
            fmt_num(stable.max(burst))
        ),
        Driver::Holding => format!(
            "{}: {} wanted; waiting {} more of the scale-down delay",
            instances(n),
            wanted,
            fmt_dur(s.scale_down_delay - (now - state.below_since.unwrap_or(now)))
        ),
    };
    Decision {
        state,
        driver,
        wanted,
        stable,
        burst,
        requests_per_s,
        cpu,
        idle_for,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Millis = 1000;

    fn settings(min: u32, max: u32) -> Settings {
        Settings::new(min, max, &ScalingConfig::default())
    }

    /// A simulated app: routers report once a second; instances become
    /// ready `ready_after` ms after the autoscaler asks for them.
    struct Sim {
        settings: Settings,
        signals: Signals,
        state: Option<State>,
        now: Millis,
        ready_after: Millis,
        /// (time asked, count asked): readiness follows with a delay.
        asked: Vec<(Millis, u32)>,
        history: Vec<(Millis, u32)>,
    }

    impl Sim {
        fn new(settings: Settings) -> Sim {
            Sim {
                settings,
                signals: Signals {
                    last_activity: Some(0),
                    ..Signals::default()
                },
                state: None,
                now: 0,
                ready_after: 0,
                asked: Vec::new(),
                history: Vec::new(),
            }
        }

        /// One second passes with `concurrency` requests in flight on
        /// average (and as many served), then the autoscaler decides.
        fn second(&mut self, concurrency: f64) -> Decision {
            let start = self.now;
            self.now += SEC;
            if concurrency > 0.0 {
                self.signals.concurrency.push(Sample {
                    start,
                    end: self.now,
                    value: concurrency,
                });
                self.signals.requests.push(Sample {
                    start,
                    end: self.now,
                    value: concurrency * 10.0,
                });
                self.signals.last_activity = Some(self.now);
            } else if self
                .signals
                .concurrency
                .last()
                .is_some_and(|s| s.value > 0.0)
            {
                // The router sends one trailing idle report, then nothing.
                self.signals.concurrency.push(Sample {
                    start,
                    end: self.now,
                    value: 0.0,
                });
            }
            self.decide()
        }

        fn decide(&mut self) -> Decision {
            let ready_now = self
                .asked
                .iter()
                .rev()
                .find(|(t, _)| self.now - t >= self.ready_after)
                .map_or(0, |(_, n)| *n);
            self.signals.ready = ready_now;
            let d = decide(&self.settings, &self.signals, self.state.as_ref(), self.now);
            if self.state.as_ref().map(|s| s.desired) != Some(d.state.desired) {
                self.asked.push((self.now, d.state.desired));
                self.history.push((self.now, d.state.desired));
            }
            self.state = Some(d.state.clone());
            d
        }

        fn desired(&self) -> u32 {
            self.state.as_ref().map_or(0, |s| s.desired)
        }
    }

    #[test]
    fn burst_scales_up_at_once_and_down_after_the_delay() {
        let mut sim = Sim::new(settings(1, 10));
        for _ in 0..60 {
            sim.second(20.0);
        }
        assert_eq!(sim.desired(), 1);
        // 250 requests in flight: within the first second of the burst, 3.
        let d = sim.second(250.0);
        assert_eq!(d.state.desired, 3, "{}", d.reason);
        assert_eq!(d.driver, Driver::Panic);
        assert!(d.reason.contains("250 in-flight"), "{}", d.reason);
        for _ in 0..20 {
            let d = sim.second(250.0);
            assert_eq!(d.state.desired, 3, "{}", d.reason);
        }
        // Once the stable window is all burst, it explains the count.
        for _ in 0..40 {
            sim.second(250.0);
        }
        let d = sim.decide();
        assert!(
            d.reason
                .starts_with("3 instances: 250 in-flight / target 100"),
            "{}",
            d.reason
        );
        // The burst ends: nothing is removed while in panic mode or before
        // the scale-down delay, then it steps down to the minimum.
        let end = sim.now;
        let mut down_at = None;
        for _ in 0..300 {
            let d = sim.second(0.0);
            if d.state.desired < 3 && down_at.is_none() {
                down_at = Some(sim.now);
            }
        }
        let down_at = down_at.expect("scaled down");
        assert!(
            down_at - end >= sim.settings.scale_down_delay,
            "scaled down {} ms after the burst",
            down_at - end
        );
        assert_eq!(sim.desired(), 1);
        assert!(down_at - end <= 2 * 60 * SEC, "{}", down_at - end);
    }

    #[test]
    fn slow_ramp_follows_the_load_without_overshoot() {
        let mut sim = Sim::new(settings(1, 10));
        sim.ready_after = 500;
        let mut last = 1;
        for t in 0..600 {
            let load = f64::from(t) * 0.5; // 0 → 300 over 10 minutes
            let d = sim.second(load);
            assert!(
                d.state.desired >= last,
                "never scales down on a rising load: {}",
                d.reason
            );
            let needed = units(load, 100.0).max(1);
            assert!(
                d.state.desired <= needed + 1,
                "t={t}: {} for a load of {load}",
                d.state.desired
            );
            last = d.state.desired;
        }
        assert_eq!(sim.desired(), 3);
        // Each step up happened once: no flapping on the way.
        let ups = sim.history.windows(2).filter(|w| w[1].1 > w[0].1).count();
        assert!(ups <= 3, "{:?}", sim.history);
    }

    #[test]
    fn idle_app_goes_to_zero_after_the_idle_timeout_only() {
        let mut sim = Sim::new(settings(0, 4));
        let d = sim.second(5.0);
        assert_eq!(d.state.desired, 1);
        let busy_until = sim.now;
        loop {
            let d = sim.second(0.0);
            let idle = sim.now - busy_until;
            if idle < 5 * 60 * SEC {
                assert_eq!(d.state.desired, 1, "after {idle} ms: {}", d.reason);
            } else {
                assert_eq!(d.state.desired, 0, "after {idle} ms: {}", d.reason);
                assert!(
                    d.reason.starts_with("0 instances: idle for 5m"),
                    "{}",
                    d.reason
                );
                break;
            }
        }
        // Idle timeout 0 disables scaling to zero.
        let mut s = settings(0, 4);
        s.idle_timeout = 0;
        let mut sim = Sim::new(s);
        sim.second(5.0);
        for _ in 0..3600 {
            sim.second(0.0);
        }
        assert_eq!(sim.desired(), 1);
        // A minimum of 1 is never gone below.
        let mut sim = Sim::new(settings(1, 4));
        for _ in 0..900 {
            sim.second(0.0);
        }
        assert_eq!(sim.desired(), 1);
    }

    #[test]
    fn queued_workflows_keep_an_idle_app_up_and_add_demand() {
        let mut sim = Sim::new(settings(0, 10));
        sim.signals.queued_workflows = 3;
        for _ in 0..3600 {
            sim.second(0.0);
        }
        let d = sim.decide();
        assert_eq!(d.state.desired, 1, "{}", d.reason);
        assert!(d.reason.contains("3 queued workflows"), "{}", d.reason);
        // A deep queue sizes the app like requests in flight do.
        sim.signals.queued_workflows = 450;
        let d = sim.decide();
        assert_eq!(d.state.desired, 5, "{}", d.reason);
        // Drained: back to zero only once idle again.
        sim.signals.queued_workflows = 0;
        let d = sim.decide();
        assert_eq!(d.state.desired, 0, "{}", d.reason);
    }

    #[test]
    fn flapping_demand_does_not_flap_the_instances() {
        let mut sim = Sim::new(settings(1, 10));
        for t in 0..1200 {
            // 150 and 50 in flight, alternating every 5 s, for 20 minutes.
            let load = if (t / 5) % 2 == 0 { 150.0 } else { 50.0 };
            sim.second(load);
        }
        let changes = sim.history.len();
        assert!(changes <= 2, "{:?}", sim.history);
        assert_eq!(sim.desired(), 2);
        // Short spikes between idle seconds: same.
        let mut sim = Sim::new(settings(1, 10));
        sim.second(0.0);
        for t in 0..600 {
            sim.second(if t % 20 == 0 { 180.0 } else { 20.0 });
        }
        assert!(sim.history.len() <= 3, "{:?}", sim.history);
    }

    #[test]
    fn waking_from_zero_asks_for_one_instance_per_target() {
        let s = settings(0, 10);
        let asleep = State {
            desired: 0,
            ..State::default()
        };
        let now = 10 * 60 * SEC;
        // 100 requests held: exactly one instance (100 / 100).
        let signals = Signals {
            waiting: 100,
            concurrency: vec![Sample {
                start: now,
                end: now,
                value: 100.0,
            }],
            last_activity: Some(now),
            ..Signals::default()
        };
        let d = decide(&s, &signals, Some(&asleep), now);
        assert_eq!(d.state.desired, 1, "{}", d.reason);
        assert_eq!(d.driver, Driver::Waking);
        // One held request: one instance.
        let signals = Signals {
            waiting: 1,
            last_activity: Some(now),
            ..Signals::default()
        };
        let d = decide(&s, &signals, Some(&asleep), now);
        assert_eq!(d.state.desired, 1, "{}", d.reason);
        // 250 held: three.
        let signals = Signals {
            waiting: 250,
            last_activity: Some(now),
            ..Signals::default()
        };
        assert_eq!(decide(&s, &signals, Some(&asleep), now).state.desired, 3);
    }

    #[test]
    fn cpu_and_bounds() {
        let s = settings(2, 5);
        let now = 100 * SEC;
        let busy = |cores: f64| Signals {
            cpu: vec![Sample {
                start: now - 60 * SEC,
                end: now,
                value: cores,
            }],
            last_activity: Some(now),
            ready: 2,
            ..Signals::default()
        };
        // 2 cores at 80% of a core per instance: 3.
        let d = decide(&s, &busy(2.0), None, now);
        assert_eq!(
            (d.state.desired, d.driver),
            (3, Driver::Cpu),
            "{}",
            d.reason
        );
        // Clamped to max, and never below min.
        let d = decide(&s, &busy(20.0), None, now);
        assert_eq!(
            (d.state.desired, d.driver),
            (5, Driver::Max),
            "{}",
            d.reason
        );
        assert!(
            d.reason.starts_with("5 instances: at max 5"),
            "{}",
            d.reason
        );
        let d = decide(&s, &busy(0.0), None, now);
        assert_eq!(
            (d.state.desired, d.driver),
            (2, Driver::Min),
            "{}",
            d.reason
        );
        // CPU target 0 ignores CPU.
        let mut s = s;
        s.target_cpu = None;
        assert_eq!(decide(&s, &busy(20.0), None, now).state.desired, 2);
    }

    #[test]
    fn window_average_counts_from_the_first_sample_and_bridges_report_gaps() {
        let one = |start, end, value| Sample { start, end, value };
        // A burst that started 1 s ago is not diluted by the idle minute.
        assert_eq!(
            window_average(&[one(9_000, 10_000, 250.0)], 10_000, 60_000),
            250.0
        );
        // The next report is due: the gap is not counted as idle.
        assert_eq!(
            window_average(&[one(9_000, 10_000, 250.0)], 11_000, 60_000),
            250.0
        );
        // Long after the last (busy) report: decays.
        let v = window_average(&[one(9_000, 10_000, 250.0)], 19_000, 60_000);
        assert!((v - 25.0).abs() < 1e-9, "{v}");
        // Two routers' samples add up.
        let v = window_average(&[one(0, 1_000, 100.0), one(0, 1_000, 50.0)], 1_000, 60_000);
        assert!((v - 150.0).abs() < 1e-9, "{v}");
        // Out of the window: nothing.
        assert_eq!(
            window_average(&[one(0, 1_000, 100.0)], 100_000, 60_000),
            0.0
        );
        assert_eq!(window_average(&[], 100_000, 60_000), 0.0);
        // Rates.
        let r = window_rate(
            &[one(0, 1_000, 500.0), one(1_000, 2_000, 500.0)],
            2_000,
            60_000,
        );
        assert!((r - 500.0).abs() < 1e-9, "{r}");
    }

    #[test]
    fn float_noise_does_not_add_an_instance() {
        assert_eq!(units(100.000_000_1, 100.0), 1);
        assert_eq!(units(100.5, 100.0), 2);
        assert_eq!(units(0.0, 100.0), 0);
        assert_eq!(units(f64::NAN, 100.0), 0);
        assert_eq!(units(1e30, 1.0), u32::MAX / 2);
    }
}
