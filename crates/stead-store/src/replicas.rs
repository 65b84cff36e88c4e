//! What lets several control-plane replicas share one database: a check
//! that they all hold the same secret key, and leases for work that one
//! replica at a time should do.

use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::{get_i64, get_str, now_ms, Result, Store, StoreError};

const KEY_CHECK: &str = "secret_key_check";

fn key_check(key: &[u8; 32]) -> String {
    let mut h = Sha256::new();
    h.update(b"stead secret key check v1:");
    h.update(key);
    hex::encode(h.finalize())
}

impl Store {
    /// Records (first replica) or verifies (every later start) a check
    /// value of the store's secret key, so that a replica started with
    /// another key fails at once with a clear error instead of failing to
    /// decrypt every secret and database URL later.
    pub async fn check_secret_key(&self) -> Result<()> {
        let key = self.secret_key.ok_or(StoreError::NoSecretKey)?;
        let mine = key_check(&key);
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(KEY_CHECK)
        .bind(&mine)
        .execute(&self.pool)
        .await?;
        let row = sqlx::query("SELECT value FROM settings WHERE key = $1")
            .bind(KEY_CHECK)
            .fetch_one(&self.pool)
            .await?;
        if get_str(&row, "value")? == mine {
            Ok(())
        } else {
            Err(StoreError::KeyMismatch)
        }
    }

    /// Takes or renews the lease `name` for `holder` until now + `ttl`:
    /// true when `holder` holds it now. Another holder's lease is taken
    /// only once it has expired; one statement, so two replicas racing for
    /// an expired lease cannot both win.
    pub async fn acquire_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool> {
        let now = now_ms();
        let until = now + ttl.as_millis() as i64;
        let r = sqlx::query(
            "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
             WHERE leases.holder = excluded.holder OR leases.expires_at < $4",
        )
        .bind(name)
        .bind(holder)
        .bind(until)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Gives the lease up (a replica shutting down), so another takes it
    /// over at once rather than when it expires.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// `NOTIFY channel, payload` (PostgreSQL only; a no-op on SQLite, where
    /// there is one replica).
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<()> {
        if self.backend == crate::Backend::Postgres {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(channel)
                .bind(payload)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// Who holds the lease `name` and until when (epoch ms), if anyone
    /// holds it unexpired.
    pub async fn lease_holder(&self, name: &str) -> Result<Option<(String, i64)>> {
        let row = sqlx::query("SELECT holder, expires_at FROM leases WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let expires = get_i64(&row, "expires_at")?;
        if expires < now_ms() {
            return Ok(None);
        }
        Ok(Some((get_str(&row, "holder")?, expires)))
    }
}
