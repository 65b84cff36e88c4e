//! A small migration runner: numbered SQL files per backend, each applied in
//! its own transaction and recorded in `schema_migrations`, so a crash mid-way
//! leaves either the old or the new schema and the next start finishes the job.

use crate::{now_ms, Backend, Result, Store, StoreError};

const SQLITE: &[(i64, &str)] = &[
    (1, include_str!("../migrations/sqlite/0001_initial.sql")),
    (2, include_str!("../migrations/sqlite/0002_promotion.sql")),
    (3, include_str!("../migrations/sqlite/0003_dbos.sql")),
    (4, include_str!("../migrations/sqlite/0004_scale.sql")),
    (5, include_str!("../migrations/sqlite/0005_replicas.sql")),
    (6, include_str!("../migrations/sqlite/0006_hosts.sql")),
    (7, include_str!("../migrations/sqlite/0007_revision.sql")),
];
const POSTGRES: &[(i64, &str)] = &[
    (1, include_str!("../migrations/postgres/0001_initial.sql")),
    (2, include_str!("../migrations/postgres/0002_promotion.sql")),
    (3, include_str!("../migrations/postgres/0003_dbos.sql")),
    (4, include_str!("../migrations/postgres/0004_scale.sql")),
    (5, include_str!("../migrations/postgres/0005_replicas.sql")),
    (6, include_str!("../migrations/postgres/0006_hosts.sql")),
    (7, include_str!("../migrations/postgres/0007_revision.sql")),
];

pub(crate) async fn run(store: &Store) -> Result<()> {
    let migrations = match store.backend {
        Backend::Sqlite => SQLITE,
        Backend::Postgres => POSTGRES,
    };
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
    )
    .execute(&store.pool)
    .await?;
    for (version, sql) in migrations {
        let mut tx = store.pool.begin().await?;
        if store.backend == Backend::Postgres {
            // Several control-plane replicas may start at once; the lock makes
            // the second wait and then see the migration as applied.
            sqlx::raw_sql("LOCK TABLE schema_migrations IN EXCLUSIVE MODE")
                .execute(&mut *tx)
                .await?;
        }
        let done = sqlx::query("SELECT version FROM schema_migrations WHERE version = $1")
            .bind(*version)
            .fetch_optional(&mut *tx)
            .await?;
        if done.is_some() {
            continue;
        }
        tracing::info!(version, database = %store.database, "applying migration");
        sqlx::raw_sql(sql)
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::Migration {
                version: *version,
                message: e.to_string(),
            })?;
        sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
            .bind(*version)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    Ok(())
}
