//! The control plane's intended state in SQLite or PostgreSQL, through one code path.
