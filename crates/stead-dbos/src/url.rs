//! System database URLs, read the way the DBOS libraries read them.
//!
//! The apps get their system database as `DBOS_SYSTEM_DATABASE_URL`, and the
//! Python library hands it to SQLAlchemy. So a SQLite URL must be read with
//! SQLAlchemy's rule, or Stead and the app would open different files:
//! `sqlite:///NAME` is the path `NAME` *relative to the working directory*, and
//! an absolute path takes a fourth slash, `sqlite:////abs/path`. A relative
//! path means nothing to a platform process whose working directory is not the
//! app's, so it is refused with a message that says how to write it.

use std::path::PathBuf;

use crate::DbosError;

/// Where a system database lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// A PostgreSQL URL in the form sqlx accepts.
    Postgres { url: String },
    /// An absolute path to a SQLite file.
    Sqlite { path: PathBuf },
}

/// Parses a `DBOS_SYSTEM_DATABASE_URL`.
pub(crate) fn parse(url: &str) -> Result<Target, DbosError> {
    let invalid = |reason: String| DbosError::InvalidUrl {
        url: redact(url),
        reason,
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(invalid(
            "expected postgresql://USER@HOST:PORT/DB or sqlite:////ABSOLUTE/PATH".into(),
        ));
    };
    // SQLAlchemy URLs may name a driver: `postgresql+psycopg://`.
    let base = scheme.split('+').next().unwrap_or(scheme);
    match base {
        "postgres" | "postgresql" => Ok(Target::Postgres {
            url: format!("postgres://{rest}"),
        }),
        "sqlite" => {
            // SQLAlchemy: everything after `sqlite:///` is the path, query dropped.
            let path = rest.split('?').next().unwrap_or("");
            let Some(path) = path.strip_prefix('/') else {
                return Err(invalid(
                    "a SQLite URL needs a path: sqlite:////ABSOLUTE/PATH".into(),
                ));
            };
            if path.is_empty() || path == ":memory:" {
                return Err(invalid(
                    "an in-memory SQLite database cannot be shared with the app; use sqlite:////ABSOLUTE/PATH".into(),
                ));
            }
            if !path.starts_with('/') {
                return Err(invalid(format!(
                    "this names the relative path {path:?} (SQLAlchemy, which the DBOS library uses, reads \
                     three slashes as relative to the app's working directory); write an absolute path \
                     with four slashes: sqlite:////{path}"
                )));
            }
            Ok(Target::Sqlite {
                path: PathBuf::from(path),
            })
        }
        other => Err(invalid(format!(
            "unsupported scheme {other:?}: the DBOS system database is PostgreSQL or SQLite"
        ))),
    }
}

/// The URL without its password, for messages and logs.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{tail}")
            } else {
                format!("{scheme}://{userinfo}@{host}{tail}")
            }
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_urls_are_accepted_in_every_spelling() {
        for u in [
            "postgres://u:p@h:5/db",
            "postgresql://u:p@h:5/db",
            "postgresql+psycopg://u:p@h:5/db",
        ] {
            assert_eq!(
                parse(u).unwrap(),
                Target::Postgres {
                    url: "postgres://u:p@h:5/db".into()
                }
            );
        }
    }

    #[test]
    fn sqlite_urls_follow_sqlalchemy() {
        assert_eq!(
            parse("sqlite:////var/lib/x.sqlite").unwrap(),
            Target::Sqlite {
                path: "/var/lib/x.sqlite".into()
            }
        );
        assert_eq!(
            parse("sqlite:////var/x.sqlite?mode=rw").unwrap(),
            Target::Sqlite {
                path: "/var/x.sqlite".into()
            }
        );
        let e = parse("sqlite:///var/x.sqlite").unwrap_err().to_string();
        assert!(e.contains("sqlite:////var/x.sqlite"), "{e}");
        assert!(parse("sqlite://").is_err());
        assert!(parse("sqlite:///:memory:").is_err());
        assert!(parse("mysql://h/db").is_err());
        assert!(parse("nonsense").is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://u:secret@h:5/db"),
            "postgres://u:***@h:5/db"
        );
        assert_eq!(redact("postgres://u@h:5/db"), "postgres://u@h:5/db");
        assert_eq!(redact("sqlite:////a/b"), "sqlite:////a/b");
        let e = parse("mysql://u:secret@h/db").unwrap_err().to_string();
        assert!(!e.contains("secret"), "{e}");
    }
}
