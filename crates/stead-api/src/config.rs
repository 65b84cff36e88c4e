//! The app config: `stead.toml`, or, for DBOS apps without one, the parts of
//! `dbos-config.yaml` that say how to build and start the app.
//!
//! Unknown keys in `stead.toml` are errors rather than warnings: a typo in
//! `[scale]` silently ignored would run the app with settings its author did
//! not choose.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::names::validate_app_name;

mod scaling;
pub use scaling::{fmt_ms, parse_duration_ms, parse_size, ScalingConfig};
use scaling::{DurationValue, SizeValue};

pub const STEAD_TOML: &str = "stead.toml";
pub const DBOS_CONFIG: &str = "dbos-config.yaml";

/// Default memory limit of an instance when the config sets none.
pub const DEFAULT_MEMORY_MB: u64 = 256;
/// Default seconds between SIGTERM and SIGKILL.
pub const DEFAULT_GRACE_S: u32 = 10;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("{file} is not valid: {message}")]
    Parse { file: &'static str, message: String },
    #[error("{file}: {message}")]
    Invalid { file: &'static str, message: String },
    #[error("the app folder has neither stead.toml nor dbos-config.yaml; create a stead.toml (see the README) naming the app and its start command")]
    Missing,
}

/// The normalised config of one app version, whatever file it came from.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct AppConfig {
    pub name: String,
    /// Which file it was read from: `stead.toml` or `dbos-config.yaml`.
    pub source: String,
    pub build: Vec<String>,
    pub start: String,
    pub port: Option<u16>,
    pub health: Option<String>,
    pub min: u32,
    pub max: u32,
    pub memory_mb: u64,
    pub migrate: Vec<String>,
    pub grace_s: u32,
    /// `python`, `node`, ... when the config says (dbos-config.yaml, or
    /// `[build] language` in stead.toml): selects the language's build
    /// conventions (a virtualenv with requirements.txt, npm ci).
    pub language: Option<String>,
    /// Seconds an instance may fail its health check before it is
    /// considered hung and replaced.
    #[serde(default = "default_health_timeout")]
    pub health_timeout_s: u32,
    /// How the workflows of a dead instance are recovered: `auto`, `admin`
    /// (the DBOS admin endpoint), `database` (re-enqueue in the system
    /// database), `executor-id` (start the replacement with the dead
    /// instance's executor id) or `none`.
    #[serde(default = "default_recovery")]
    pub recovery: String,
    /// Port of the DBOS admin server inside the instance, when it runs one.
    #[serde(default = "default_admin_port")]
    pub admin_port: u16,
    /// Autoscaling targets and per-app traffic limits (`[scale]`,
    /// `[run] max_body`); defaults for configs stored before they existed.
    #[serde(default)]
    pub scaling: ScalingConfig,
    /// `[run] sandbox`: the sandbox backend its instances need, `process`
    /// or `gvisor`; `None`: the host's default. Placement only puts the
    /// app on hosts that have it.
    #[serde(default)]
    pub sandbox: Option<String>,
    /// `[run] egress`: instances may open connections to the outside world
    /// (never to the platform, the host or other apps). Off by default.
    #[serde(default)]
    pub egress: bool,
    /// `[build] cache`: folders of the app (relative paths, e.g. `target`)
    /// that a host keeps from one build of the app to the next and puts
    /// back before building, like a CI cache, so that a Rust app's second
    /// deploy recompiles only what changed.
    #[serde(default)]
    pub build_cache: Vec<String>,
}

/// Sandbox backends an app may ask for (`[run] sandbox`).
pub const SANDBOX_BACKENDS: &[&str] = &["process", "gvisor"];

fn default_health_timeout() -> u32 {
    DEFAULT_HEALTH_TIMEOUT_S
}
fn default_recovery() -> String {
    "auto".into()
}
fn default_admin_port() -> u16 {
    3001
}

/// Default seconds of failed health checks before an instance is replaced.
pub const DEFAULT_HEALTH_TIMEOUT_S: u32 = 30;
/// Recovery modes accepted in `[dbos] recovery`.
pub const RECOVERY_MODES: &[&str] = &["auto", "admin", "database", "executor-id", "none"];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SteadToml {
    name: String,
    #[serde(default)]
    build: BuildSection,
    run: RunSection,
    #[serde(default)]
    scale: ScaleSection,
    #[serde(default)]
    resources: ResourcesSection,
    #[serde(default)]
    database: DatabaseSection,
    #[serde(default)]
    dbos: DbosSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BuildSection {
    #[serde(default)]
    commands: Vec<String>,
    language: Option<String>,
    #[serde(default)]
    cache: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DbosSection {
    recovery: Option<String>,
    admin_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunSection {
    start: String,
    port: Option<u16>,
    health: Option<String>,
    /// Seconds between SIGTERM and SIGKILL.
    grace: Option<u32>,
    /// Seconds of failed health checks before the instance is replaced.
    health_timeout: Option<u32>,
    /// Largest request body the router lets through (bytes, or "10MB").
    max_body: Option<SizeValue>,
    /// Sandbox backend: "process" or "gvisor" (default: the host's).
    sandbox: Option<String>,
    /// Let instances reach the outside world (default false).
    egress: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaleSection {
    #[serde(default = "one")]
    min: u32,
    #[serde(default = "four")]
    max: u32,
    target_concurrency: Option<u32>,
    /// Percent of one core per instance.
    target_cpu: Option<u32>,
    idle_timeout: Option<DurationValue>,
    stable_window: Option<DurationValue>,
    panic_window: Option<DurationValue>,
    scale_down_delay: Option<DurationValue>,
    max_concurrency: Option<u32>,
}

impl ScaleSection {
    /// The scaling settings these keys (and `[run] max_body`) give, with
    /// defaults for the ones not written.
    fn scaling(&self, max_body: Option<&SizeValue>) -> Result<ScalingConfig, String> {
        let d = ScalingConfig::default();
        let ms = |v: &Option<DurationValue>, key: &str, default: u64| match v {
            Some(v) => v.millis(key),
            None => Ok(default),
        };
        Ok(ScalingConfig {
            target_concurrency: self.target_concurrency.unwrap_or(d.target_concurrency),
            target_cpu_percent: self.target_cpu.unwrap_or(d.target_cpu_percent),
            idle_timeout_ms: ms(&self.idle_timeout, "scale.idle_timeout", d.idle_timeout_ms)?,
            stable_window_ms: ms(
                &self.stable_window,
                "scale.stable_window",
                d.stable_window_ms,
            )?,
            panic_window_ms: ms(&self.panic_window, "scale.panic_window", d.panic_window_ms)?,
            scale_down_delay_ms: ms(
                &self.scale_down_delay,
                "scale.scale_down_delay",
                d.scale_down_delay_ms,
            )?,
            max_concurrency: self.max_concurrency.unwrap_or(0),
            max_body_bytes: match max_body {
                Some(v) => v.bytes("run.max_body")?,
                None => 0,
            },
        })
    }
}

fn one() -> u32 {
    1
}
fn four() -> u32 {
    4
}

impl Default for ScaleSection {
    fn default() -> Self {
        Self {
            min: 1,
            max: 4,
            target_concurrency: None,
            target_cpu: None,
            idle_timeout: None,
            stable_window: None,
            panic_window: None,
            scale_down_delay: None,
            max_concurrency: None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourcesSection {
    memory_mb: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatabaseSection {
    #[serde(default)]
    migrate: Vec<String>,
}

// dbos-config.yaml: only the keys Stead uses; the rest belongs to the SDKs
// and is ignored here on purpose.
#[derive(Debug, Deserialize)]
struct DbosYaml {
    name: Option<String>,
    language: Option<String>,
    #[serde(rename = "runtimeConfig", default)]
    runtime_config: Option<DbosRuntime>,
    #[serde(default)]
    database: Option<DbosDatabase>,
}

#[derive(Debug, Deserialize)]
struct DbosRuntime {
    #[serde(default)]
    start: Vec<String>,
    #[serde(default)]
    setup: Vec<String>,
    port: Option<u16>,
}

#[derive(Debug, Deserialize)]
struct DbosDatabase {
    #[serde(default)]
    migrate: Vec<String>,
}

impl AppConfig {
    /// Reads the config from the files of an app folder: `stead.toml` wins
    /// over `dbos-config.yaml`.
    pub fn from_files(
        stead_toml: Option<&str>,
        dbos_yaml: Option<&str>,
    ) -> Result<Self, ConfigError> {
        match (stead_toml, dbos_yaml) {
            (Some(t), _) => Self::from_stead_toml(t),
            (None, Some(y)) => Self::from_dbos_yaml(y),
            (None, None) => Err(ConfigError::Missing),
        }
    }

    pub fn from_stead_toml(text: &str) -> Result<Self, ConfigError> {
        let raw: SteadToml = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: STEAD_TOML,
            message: e.message().to_string() + &span_hint(text, e.span()),
        })?;
        let cfg = AppConfig {
            name: raw.name,
            source: STEAD_TOML.into(),
            build: raw.build.commands,
            start: raw.run.start,
            port: raw.run.port,
            health: raw.run.health,
            min: raw.scale.min,
            max: raw.scale.max,
            memory_mb: raw.resources.memory_mb.unwrap_or(DEFAULT_MEMORY_MB),
            migrate: raw.database.migrate,
            grace_s: raw.run.grace.unwrap_or(DEFAULT_GRACE_S),
            language: raw.build.language.map(|l| l.to_ascii_lowercase()),
            health_timeout_s: raw.run.health_timeout.unwrap_or(DEFAULT_HEALTH_TIMEOUT_S),
            recovery: raw.dbos.recovery.unwrap_or_else(default_recovery),
            admin_port: raw.dbos.admin_port.unwrap_or(3001),
            scaling: raw
                .scale
                .scaling(raw.run.max_body.as_ref())
                .map_err(|message| ConfigError::Invalid {
                    file: STEAD_TOML,
                    message,
                })?,
            sandbox: raw.run.sandbox,
            egress: raw.run.egress.unwrap_or(false),
            build_cache: raw.build.cache,
        };
        cfg.validate(STEAD_TOML)?;
        Ok(cfg)
    }

    pub fn from_dbos_yaml(text: &str) -> Result<Self, ConfigError> {
        let raw: DbosYaml = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
            file: DBOS_CONFIG,
            message: e.to_string(),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            file: DBOS_CONFIG,
            message,
        };
        let name = raw
            .name
            .ok_or_else(|| invalid("`name` is missing; add `name: my-app`".into()))?;
        let runtime = raw.runtime_config.ok_or_else(|| {
            invalid("`runtimeConfig.start` is missing; add the command that starts the app".into())
        })?;
        if runtime.start.is_empty() {
            return Err(invalid(
                "`runtimeConfig.start` is empty; add the command that starts the app".into(),
            ));
        }
        let language = raw.language.map(|l| l.to_ascii_lowercase());
        // Python DBOS apps serve on 8000 and TypeScript ones on 3000 by
        // convention; neither SDK reads PORT.
        let port = runtime.port.or(match language.as_deref() {
            Some("python") => Some(8000),
            Some("node") | Some("typescript") => Some(3000),
            _ => None,
        });
        let cfg = AppConfig {
            name,
            source: DBOS_CONFIG.into(),
            build: runtime.setup,
            start: runtime.start.join(" && "),
            port,
            health: None,
            min: 1,
            max: 4,
            memory_mb: DEFAULT_MEMORY_MB,
            migrate: raw.database.map(|d| d.migrate).unwrap_or_default(),
            grace_s: DEFAULT_GRACE_S,
            language,
            health_timeout_s: DEFAULT_HEALTH_TIMEOUT_S,
            recovery: default_recovery(),
            admin_port: 3001,
            scaling: ScalingConfig::default(),
            sandbox: None,
            egress: false,
            build_cache: Vec::new(),
        };
        cfg.validate(DBOS_CONFIG)?;
        Ok(cfg)
    }

    fn validate(&self, file: &'static str) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid { file, message };
        validate_app_name(&self.name).map_err(invalid)?;
        if let Some(b) = &self.sandbox {
            if !SANDBOX_BACKENDS.contains(&b.as_str()) {
                return Err(invalid(format!(
                    "`run.sandbox` must be one of {}, got {b:?}",
                    SANDBOX_BACKENDS.join(", ")
                )));
            }
        }
        if self.start.trim().is_empty() {
            return Err(invalid(
                "`run.start` is empty; set the command that starts the app".into(),
            ));
        }
        if self.port == Some(0) {
            return Err(invalid("`run.port` must be between 1 and 65535".into()));
        }
        if let Some(h) = &self.health {
            if !h.starts_with('/') {
                return Err(invalid(format!(
                    "`run.health` must be an HTTP path starting with '/', got {h:?}"
                )));
            }
        }
        if self.max == 0 {
            return Err(invalid("`scale.max` must be at least 1".into()));
        }
        if self.min > self.max {
            return Err(invalid(format!(
                "`scale.min` ({}) is larger than `scale.max` ({})",
                self.min, self.max
            )));
        }
        self.scaling.validate().map_err(invalid)?;
        if self.max > 1000 {
            return Err(invalid(format!(
                "`scale.max` ({}) is above the limit of 1000",
                self.max
            )));
        }
        if !(16..=65536).contains(&self.memory_mb) {
            return Err(invalid(format!(
                "`resources.memory_mb` ({}) must be between 16 and 65536",
                self.memory_mb
            )));
        }
        if !RECOVERY_MODES.contains(&self.recovery.as_str()) {
            return Err(invalid(format!(
                "`dbos.recovery` is {:?}; use one of {}",
                self.recovery,
                RECOVERY_MODES.join(", ")
            )));
        }
        if self.health_timeout_s == 0 || self.health_timeout_s > 3600 {
            return Err(invalid(format!(
                "`run.health_timeout` ({} s) must be between 1 and 3600",
                self.health_timeout_s
            )));
        }
        if self.grace_s > 3600 {
            return Err(invalid(format!(
                "`run.grace` ({} s) must be at most 3600",
                self.grace_s
            )));
        }
        if self.build_cache.len() > 8 {
            return Err(invalid(format!(
                "`build.cache` lists {} folders; at most 8 are kept",
                self.build_cache.len()
            )));
        }
        for c in &self.build_cache {
            if !is_cache_path(c) {
                return Err(invalid(format!(
                    "`build.cache` entry {c:?} is not a folder inside the app: use a relative path \
                     without `..`, such as \"target\""
                )));
            }
        }
        for c in self.build.iter().chain(self.migrate.iter()) {
            if c.trim().is_empty() {
                return Err(invalid(
                    "build and migration commands must not be empty strings".into(),
                ));
            }
        }
        Ok(())
    }
}

/// A `[build] cache` entry: a relative path of plain components inside the
/// app folder (no `..`, `.`, empty or absolute parts, no NUL), at most 200
/// bytes, so that the agent can join it to the build folder and to its
/// cache folder without leaving either.
pub fn is_cache_path(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 200
        && !p.starts_with('/')
        && !p.contains('\0')
        && !p.contains('\\')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(r) => {
            let line = text[..r.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
name = "hello"
[build]
commands = ["cargo build --release"]
[run]
start = "./target/release/hello"
port = 8000
health = "/healthz"
[scale]
min = 1
max = 4
[resources]
memory_mb = 256
[database]
migrate = ["python3 migrate.py"]
"#;

    #[test]
    fn parses_the_documented_example() {
        let c = AppConfig::from_stead_toml(FULL).unwrap();
        assert_eq!(c.name, "hello");
        assert_eq!(c.build, vec!["cargo build --release"]);
        assert_eq!(c.start, "./target/release/hello");
        assert_eq!(c.port, Some(8000));
        assert_eq!(c.health.as_deref(), Some("/healthz"));
        assert_eq!((c.min, c.max), (1, 4));
        assert_eq!(c.memory_mb, 256);
        assert_eq!(c.migrate, vec!["python3 migrate.py"]);
    }

    #[test]
    fn sandbox_and_egress_are_read_and_checked() {
        let c = AppConfig::from_stead_toml(
            "name = \"abc\"\n[run]\nstart = \"x\"\nsandbox = \"gvisor\"\negress = true\n",
        )
        .unwrap();
        assert_eq!((c.sandbox.as_deref(), c.egress), (Some("gvisor"), true));
        let c = AppConfig::from_stead_toml("name = \"abc\"\n[run]\nstart = \"x\"\n").unwrap();
        assert_eq!((c.sandbox.as_deref(), c.egress), (None, false));
        let e = AppConfig::from_stead_toml(
            "name = \"abc\"\n[run]\nstart = \"x\"\nsandbox = \"docker\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("run.sandbox") && e.contains("gvisor"), "{e}");
        // Configs stored before the fields existed still load.
        let mut v = serde_json::to_value(&c).unwrap();
        v.as_object_mut().unwrap().remove("sandbox");
        v.as_object_mut().unwrap().remove("egress");
        let back: AppConfig = serde_json::from_value(v).unwrap();
        assert_eq!((back.sandbox, back.egress), (None, false));
    }

    #[test]
    fn build_cache_folders_are_read_and_checked() {
        let c = AppConfig::from_stead_toml(
            "name = \"abc\"\n[build]\ncache = [\"target\", \"web/.cache\"]\n[run]\nstart = \"x\"\n",
        )
        .unwrap();
        assert_eq!(c.build_cache, vec!["target", "web/.cache"]);
        for bad in ["../up", "/abs", "a/../b", "", "./x", "a//b", "a\\\\b"] {
            let e = AppConfig::from_stead_toml(&format!(
                "name = \"abc\"\n[build]\ncache = [{bad:?}]\n[run]\nstart = \"x\"\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("build.cache"), "{bad:?}: {e}");
        }
        // Configs stored before the field existed still load.
        let mut v = serde_json::to_value(&c).unwrap();
        v.as_object_mut().unwrap().remove("build_cache");
        let back: AppConfig = serde_json::from_value(v).unwrap();
        assert!(back.build_cache.is_empty());
    }

    /// The README's documented stead.toml must stay valid.
    #[test]
    fn readme_example_parses() {
        let readme = include_str!("../../../README.md");
        let start = readme
            .find("```toml\nname = ")
            .expect("a toml block in the README")
            + "```toml\n".len();
        let end = start + readme[start..].find("```").expect("end of block");
        let c = AppConfig::from_stead_toml(&readme[start..end]).unwrap();
        assert_eq!(c.name, "hello");
        assert_eq!(c.language.as_deref(), Some("python"));
        assert_eq!(
            (c.recovery.as_str(), c.admin_port, c.health_timeout_s),
            ("auto", 3001, 30)
        );
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = AppConfig::from_stead_toml("name = \"abc\"\n[run]\nstart = \"./x\"\n").unwrap();
        assert_eq!((c.min, c.max, c.memory_mb, c.grace_s), (1, 4, 256, 10));
        assert!(c.build.is_empty() && c.port.is_none());
    }

    #[test]
    fn scale_targets_and_limits_are_read() {
        let c = AppConfig::from_stead_toml(
            "name = \"abc\"\n[run]\nstart = \"x\"\nmax_body = \"1MB\"\n[scale]\nmin = 0\nmax = 8\n\
             target_concurrency = 10\ntarget_cpu = 50\nidle_timeout = \"2m\"\nstable_window = 20\n\
             panic_window = \"500ms\"\nscale_down_delay = \"5s\"\nmax_concurrency = 300\n",
        )
        .unwrap();
        let s = &c.scaling;
        assert_eq!((c.min, c.max), (0, 8));
        assert_eq!((s.target_concurrency, s.target_cpu_percent), (10, 50));
        assert_eq!((s.idle_timeout_ms, s.stable_window_ms), (120_000, 20_000));
        assert_eq!((s.panic_window_ms, s.scale_down_delay_ms), (500, 5_000));
        assert_eq!((s.max_concurrency, s.max_body_bytes), (300, 1024 * 1024));
        // Defaults, also for configs stored before these keys existed.
        let d = AppConfig::from_stead_toml("name = \"abc\"\n[run]\nstart = \"x\"\n").unwrap();
        assert_eq!(d.scaling, ScalingConfig::default());
        let mut old = serde_json::to_value(&d).unwrap();
        old.as_object_mut().unwrap().remove("scaling");
        let old: AppConfig = serde_json::from_value(old).unwrap();
        assert_eq!(old.scaling.target_concurrency, 100);
        // Bad values name their key.
        for (text, needle) in [
            ("[scale]\nidle_timeout = \"soon\"\n", "scale.idle_timeout"),
            (
                "[scale]\ntarget_concurrency = 0\n",
                "scale.target_concurrency",
            ),
            ("[scale]\npanic_window = \"2m\"\n", "scale.panic_window"),
        ] {
            let err = AppConfig::from_stead_toml(&format!(
                "name = \"abc\"\n[run]\nstart = \"x\"\n{text}"
            ))
            .unwrap_err()
            .to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = AppConfig::from_stead_toml("name = \"abc\"\n[run]\nstart = \"x\"\nstrat = 1\n")
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("strat"), "{msg}");
        assert!(msg.contains("stead.toml"), "{msg}");
    }

    #[test]
    fn wrong_types_are_rejected() {
        let err =
            AppConfig::from_stead_toml("name = \"abc\"\n[run]\nstart = \"x\"\nport = \"eighty\"\n")
                .unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        let err =
            AppConfig::from_stead_toml("name = \"abc\"\n[run]\nstart = \"x\"\nport = 70000\n")
                .unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    }

    #[test]
    fn invalid_values_are_rejected() {
        let bad = [
            ("name = \"A\"\n[run]\nstart = \"x\"\n", "app name"),
            ("name = \"abc\"\n[run]\nstart = \"  \"\n", "run.start"),
            (
                "name = \"abc\"\n[run]\nstart = \"x\"\nhealth = \"healthz\"\n",
                "run.health",
            ),
            (
                "name = \"abc\"\n[run]\nstart = \"x\"\n[scale]\nmin = 5\nmax = 2\n",
                "scale.min",
            ),
            (
                "name = \"abc\"\n[run]\nstart = \"x\"\n[resources]\nmemory_mb = 1\n",
                "memory_mb",
            ),
        ];
        for (text, needle) in bad {
            let msg = AppConfig::from_stead_toml(text).unwrap_err().to_string();
            assert!(msg.contains(needle), "{needle}: {msg}");
        }
    }

    #[test]
    fn dbos_section_and_language() {
        let c = AppConfig::from_stead_toml(
            "name = \"abc\"\n[build]\nlanguage = \"Python\"\n[run]\nstart = \"x\"\nhealth_timeout = 5\n[dbos]\nrecovery = \"admin\"\nadmin_port = 3002\n",
        )
        .unwrap();
        assert_eq!(c.language.as_deref(), Some("python"));
        assert_eq!(
            (c.recovery.as_str(), c.admin_port, c.health_timeout_s),
            ("admin", 3002, 5)
        );
        let err = AppConfig::from_stead_toml(
            "name = \"abc\"\n[run]\nstart = \"x\"\n[dbos]\nrecovery = \"magic\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("dbos.recovery"), "{err}");
    }

    #[test]
    fn missing_run_section_is_an_error() {
        assert!(AppConfig::from_stead_toml("name = \"abc\"\n").is_err());
    }

    #[test]
    fn dbos_yaml_is_read() {
        let y = r#"
name: greeter
language: python
runtimeConfig:
  start:
    - "python3 main.py"
  setup:
    - "echo setup"
database:
  migrate:
    - "alembic upgrade head"
database_url: ${DBOS_DATABASE_URL}
"#;
        let c = AppConfig::from_files(None, Some(y)).unwrap();
        assert_eq!(c.name, "greeter");
        assert_eq!(c.start, "python3 main.py");
        assert_eq!(c.build, vec!["echo setup"]);
        assert_eq!(c.migrate, vec!["alembic upgrade head"]);
        assert_eq!(c.port, Some(8000));
        assert_eq!(c.language.as_deref(), Some("python"));
        assert_eq!(c.source, "dbos-config.yaml");
    }

    #[test]
    fn stead_toml_wins_over_dbos_yaml() {
        let c = AppConfig::from_files(
            Some("name = \"abc\"\n[run]\nstart = \"x\"\n"),
            Some("name: other\nruntimeConfig:\n  start: [\"y\"]\n"),
        )
        .unwrap();
        assert_eq!(c.name, "abc");
        assert_eq!(AppConfig::from_files(None, None), Err(ConfigError::Missing));
    }
}
