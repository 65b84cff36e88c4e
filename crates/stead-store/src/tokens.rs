//! Organisations, users and API tokens. Only the SHA-256 of a token is kept:
//! a leaked database then grants nothing, and tokens carry 256 random bits so
//! an unsalted hash is enough.

use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::Row;
use stead_api::TokenKind;

use crate::{get_opt_i64, get_opt_str, get_str, now_ms, Result, Store, StoreError};

/// Who a token speaks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub kind: TokenKind,
    /// Set for user tokens; host tokens belong to no organisation.
    pub org_id: Option<i64>,
    pub org: Option<String>,
    pub user: Option<String>,
}

const TOKEN_PREFIX: &str = "stead_";

/// Hex SHA-256 of a token, the form it is stored and looked up in.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{TOKEN_PREFIX}{}", base64url(&bytes))
}

/// Unpadded base64url: 32 bytes become 43 characters.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len() * 4 / 3 + 2);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Whether a string has the shape of a Stead token, so malformed credentials
/// can be told apart from unknown ones without a database lookup.
pub fn looks_like_token(token: &str) -> bool {
    token.strip_prefix(TOKEN_PREFIX).is_some_and(|rest| {
        (20..=128).contains(&rest.len())
            && rest
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

impl Store {
    /// Creates the organisation and user if they are new and returns a new
    /// token for them; the plaintext is returned only here, once.
    pub async fn create_user_token(&self, org: &str, user: &str) -> Result<String> {
        if org.trim().is_empty() || user.trim().is_empty() {
            return Err(StoreError::Invalid(
                "organisation and user names must not be empty".into(),
            ));
        }
        self.retry("create_user_token", || async {
            let token = new_token();
            let now = now_ms();
            let mut tx = self.pool.begin().await?;
            sqlx::query("INSERT INTO orgs (name, created_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
                .bind(org)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            let org_id: i64 = sqlx::query("SELECT id FROM orgs WHERE name = $1")
                .bind(org)
                .fetch_one(&mut *tx)
                .await?
                .try_get("id")?;
            sqlx::query("INSERT INTO users (org_id, name, created_at) VALUES ($1, $2, $3) ON CONFLICT (org_id, name) DO NOTHING")
                .bind(org_id)
                .bind(user)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            let user_id: i64 = sqlx::query("SELECT id FROM users WHERE org_id = $1 AND name = $2")
                .bind(org_id)
                .bind(user)
                .fetch_one(&mut *tx)
                .await?
                .try_get("id")?;
            sqlx::query("INSERT INTO tokens (hash, kind, org_id, user_id, created_at) VALUES ($1, 'user', $2, $3, $4)")
                .bind(hash_token(&token))
                .bind(org_id)
                .bind(user_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(token)
        })
        .await
    }

    /// Creates a token for data-plane agents and routers.
    pub async fn create_host_token(&self) -> Result<String> {
        let token = new_token();
        sqlx::query("INSERT INTO tokens (hash, kind, created_at) VALUES ($1, 'host', $2)")
            .bind(hash_token(&token))
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(token)
    }

    /// Looks a presented token up; `None` when it is unknown or revoked.
    pub async fn authenticate(&self, token: &str) -> Result<Option<Principal>> {
        let row = sqlx::query(
            "SELECT t.kind AS kind, t.org_id AS org_id, o.name AS org, u.name AS username \
             FROM tokens t LEFT JOIN orgs o ON o.id = t.org_id LEFT JOIN users u ON u.id = t.user_id \
             WHERE t.hash = $1",
        )
        .bind(hash_token(token))
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let kind = match get_str(&row, "kind")?.as_str() {
            "user" => TokenKind::User,
            "host" => TokenKind::Host,
            other => {
                return Err(StoreError::Corrupt {
                    table: "tokens",
                    message: format!("unknown token kind {other:?}"),
                })
            }
        };
        Ok(Some(Principal {
            kind,
            org_id: get_opt_i64(&row, "org_id")?,
            org: get_opt_str(&row, "org")?,
            user: get_opt_str(&row, "username")?,
        }))
    }

    /// Revokes a token given in plaintext; true when it existed.
    pub async fn revoke_token(&self, token: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM tokens WHERE hash = $1")
            .bind(hash_token(token))
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_the_documented_shape() {
        let t = new_token();
        assert!(t.starts_with("stead_"));
        assert_eq!(t.len(), 6 + 43);
        assert!(looks_like_token(&t));
        assert!(!looks_like_token("Bearer x"));
        assert_eq!(base64url(b"\xff\xff\xff"), "____");
        assert_eq!(base64url(b"hi"), "aGk");
    }
}
