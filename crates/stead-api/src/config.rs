//! The app config: `stead.toml`, or, for DBOS apps without one, the parts of
//! `dbos-config.yaml` that say how to build and start the app.
//!
//! Unknown keys in `stead.toml` are errors rather than warnings: a typo in
//! `[scale]` silently ignored would run the app with settings its author did
//! not choose.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::names::validate_app_name;

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
    /// `python`, `node`, ... when the config says (dbos-config.yaml).
    pub language: Option<String>,
}

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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BuildSection {
    #[serde(default)]
    commands: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunSection {
    start: String,
    port: Option<u16>,
    health: Option<String>,
    /// Seconds between SIGTERM and SIGKILL.
    grace: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaleSection {
    #[serde(default = "one")]
    min: u32,
    #[serde(default = "four")]
    max: u32,
}

fn one() -> u32 {
    1
}
fn four() -> u32 {
    4
}

impl Default for ScaleSection {
    fn default() -> Self {
        Self { min: 1, max: 4 }
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
            language: None,
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
        };
        cfg.validate(DBOS_CONFIG)?;
        Ok(cfg)
    }

    fn validate(&self, file: &'static str) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid { file, message };
        validate_app_name(&self.name).map_err(invalid)?;
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
        if self.grace_s > 3600 {
            return Err(invalid(format!(
                "`run.grace` ({} s) must be at most 3600",
                self.grace_s
            )));
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
    fn minimal_config_gets_defaults() {
        let c = AppConfig::from_stead_toml("name = \"abc\"\n[run]\nstart = \"./x\"\n").unwrap();
        assert_eq!((c.min, c.max, c.memory_mb, c.grace_s), (1, 4, 256, 10));
        assert!(c.build.is_empty() && c.port.is_none());
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
