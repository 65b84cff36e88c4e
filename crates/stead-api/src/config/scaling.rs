//! The autoscaler's targets and the router's per-app limits, as an app's
//! config states them (`[scale]` and `[run] max_body` in stead.toml).
//!
//! Durations and sizes are written the way people think of them
//! (`idle_timeout = "5m"`, `max_body = "10MB"`); a bare integer is seconds
//! or bytes. Everything is stored normalised, in milliseconds and bytes.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Default requests in flight per instance the autoscaler aims at.
pub const DEFAULT_TARGET_CONCURRENCY: u32 = 100;
/// Default CPU per instance the autoscaler aims at, in percent of a core.
pub const DEFAULT_TARGET_CPU_PERCENT: u32 = 80;
/// Default time without requests after which an app with `min = 0` stops.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 5 * 60 * 1000;
/// Default window the steady demand is averaged over.
pub const DEFAULT_STABLE_WINDOW_MS: u64 = 60 * 1000;
/// Default window bursts are detected over.
pub const DEFAULT_PANIC_WINDOW_MS: u64 = 6 * 1000;
/// Default time the demand must stay lower before instances are removed.
pub const DEFAULT_SCALE_DOWN_DELAY_MS: u64 = 30 * 1000;

/// Autoscaling targets and per-app traffic limits of one app.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(default)]
pub struct ScalingConfig {
    /// Requests in flight per instance to aim at.
    pub target_concurrency: u32,
    /// CPU per instance to aim at, in percent of one core; 0 disables
    /// CPU-based scaling.
    pub target_cpu_percent: u32,
    /// With `min = 0`: stop the last instance after this long without
    /// requests or queued workflows; 0 never scales to zero.
    pub idle_timeout_ms: u64,
    /// Demand is averaged over this window to size the app.
    pub stable_window_ms: u64,
    /// A burst over this shorter window scales up at once.
    pub panic_window_ms: u64,
    /// Instances are removed only after the demand stayed lower this long.
    pub scale_down_delay_ms: u64,
    /// Requests in flight at a router above this are refused (503); 0: no limit.
    pub max_concurrency: u32,
    /// Request bodies above this many bytes are refused (413); 0: no limit.
    pub max_body_bytes: u64,
}

impl Default for ScalingConfig {
    fn default() -> Self {
        ScalingConfig {
            target_concurrency: DEFAULT_TARGET_CONCURRENCY,
            target_cpu_percent: DEFAULT_TARGET_CPU_PERCENT,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            stable_window_ms: DEFAULT_STABLE_WINDOW_MS,
            panic_window_ms: DEFAULT_PANIC_WINDOW_MS,
            scale_down_delay_ms: DEFAULT_SCALE_DOWN_DELAY_MS,
            max_concurrency: 0,
            max_body_bytes: 0,
        }
    }
}

impl ScalingConfig {
    /// Checks the values; the message names the stead.toml key at fault.
    pub fn validate(&self) -> Result<(), String> {
        const HOUR: u64 = 3600 * 1000;
        if !(1..=1_000_000).contains(&self.target_concurrency) {
            return Err(format!(
                "`scale.target_concurrency` ({}) must be between 1 and 1000000",
                self.target_concurrency
            ));
        }
        if self.target_cpu_percent > 100_000 {
            return Err(format!(
                "`scale.target_cpu` ({}%) must be at most 100000 (0 disables it)",
                self.target_cpu_percent
            ));
        }
        if !(100..=HOUR).contains(&self.stable_window_ms) {
            return Err(format!(
                "`scale.stable_window` ({}) must be between 100ms and 1h",
                fmt_ms(self.stable_window_ms)
            ));
        }
        if self.panic_window_ms < 100 || self.panic_window_ms > self.stable_window_ms {
            return Err(format!(
                "`scale.panic_window` ({}) must be at least 100ms and at most the stable window ({})",
                fmt_ms(self.panic_window_ms),
                fmt_ms(self.stable_window_ms)
            ));
        }
        if self.scale_down_delay_ms > HOUR {
            return Err(format!(
                "`scale.scale_down_delay` ({}) must be at most 1h",
                fmt_ms(self.scale_down_delay_ms)
            ));
        }
        if self.idle_timeout_ms > 7 * 24 * HOUR {
            return Err(format!(
                "`scale.idle_timeout` ({}) must be at most 7 days (0 never scales to zero)",
                fmt_ms(self.idle_timeout_ms)
            ));
        }
        Ok(())
    }
}

/// A duration as written in stead.toml: integer seconds, or a string with a
/// unit (`"500ms"`, `"30s"`, `"5m"`, `"1h"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum DurationValue {
    Seconds(u64),
    Text(String),
}

impl DurationValue {
    pub(crate) fn millis(&self, key: &str) -> Result<u64, String> {
        match self {
            DurationValue::Seconds(s) => s
                .checked_mul(1000)
                .ok_or_else(|| format!("`{key}` ({s} s) is too large")),
            DurationValue::Text(t) => parse_duration_ms(t).map_err(|e| format!("`{key}`: {e}")),
        }
    }
}

/// A size as written in stead.toml: integer bytes, or a string with a unit
/// (`"512KB"`, `"10MB"`, `"1GB"`; powers of 1024).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    pub(crate) fn bytes(&self, key: &str) -> Result<u64, String> {
        match self {
            SizeValue::Bytes(b) => Ok(*b),
            SizeValue::Text(t) => parse_size(t).map_err(|e| format!("`{key}`: {e}")),
        }
    }
}

/// Parses `"250ms"`, `"30s"`, `"5m"`, `"1h"`, `"1.5s"` or a bare number of
/// seconds into milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        format!("{text:?} is not a duration: write e.g. \"500ms\", \"30s\", \"5m\" or \"1h\"")
    })?;
    let factor = match unit.trim() {
        "ms" => 1.0,
        "" | "s" | "sec" => 1000.0,
        "m" | "min" => 60_000.0,
        "h" => 3_600_000.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}: use ms, s, m or h"
            ))
        }
    };
    let ms = value * factor;
    if !ms.is_finite() || ms < 0.0 || ms > u64::MAX as f64 / 2.0 {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(ms.round() as u64)
}

/// Parses `"512KB"`, `"10MB"`, `"1GB"` (powers of 1024), `"100B"` or a bare
/// number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        format!("{text:?} is not a size: write e.g. \"512KB\", \"10MB\" or \"1GB\"")
    })?;
    let factor = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "K" | "KB" | "KIB" => 1024.0,
        "M" | "MB" | "MIB" => 1024.0 * 1024.0,
        "G" | "GB" | "GIB" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}: use B, KB, MB or GB"
            ))
        }
    };
    let bytes = value * factor;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 / 2.0 {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(bytes.round() as u64)
}

/// A duration for people: `250ms`, `30s`, `5m`, `1h30m`.
pub fn fmt_ms(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    if !ms.is_multiple_of(1000) && ms < 60_000 {
        return format!("{:.1}s", ms as f64 / 1000.0);
    }
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 if s.is_multiple_of(60) => format!("{}m", s / 60),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        _ if s.is_multiple_of(3600) => format!("{}h", s / 3600),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("30s"), Ok(30_000));
        assert_eq!(parse_duration_ms("1.5s"), Ok(1_500));
        assert_eq!(parse_duration_ms("5m"), Ok(300_000));
        assert_eq!(parse_duration_ms("2h"), Ok(7_200_000));
        assert_eq!(parse_duration_ms("7"), Ok(7_000));
        assert_eq!(parse_duration_ms(" 0 "), Ok(0));
        assert!(parse_duration_ms("5 parsecs").is_err());
        assert!(parse_duration_ms("soon").is_err());
        assert!(parse_duration_ms("-1s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10MB"), Ok(10 * 1024 * 1024));
        assert_eq!(parse_size("512kb"), Ok(512 * 1024));
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("3 furlongs").is_err());
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_ms(250), "250ms");
        assert_eq!(fmt_ms(1500), "1.5s");
        assert_eq!(fmt_ms(30_000), "30s");
        assert_eq!(fmt_ms(300_000), "5m");
        assert_eq!(fmt_ms(90_000), "1m30s");
        assert_eq!(fmt_ms(3_600_000), "1h");
    }

    #[test]
    fn defaults_are_valid_and_bad_values_named() {
        assert_eq!(ScalingConfig::default().validate(), Ok(()));
        let c = ScalingConfig {
            panic_window_ms: 120_000,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("panic_window"));
        let c = ScalingConfig {
            target_concurrency: 0,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("target_concurrency"));
    }
}
