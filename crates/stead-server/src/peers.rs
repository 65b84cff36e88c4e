//! Change notifications between control-plane replicas on one PostgreSQL.
//!
//! Long-polls (agents' heartbeats, routers' route tables, build logs) wait
//! on the replica's in-process `changes`; a write made through another
//! replica must wake them too. Each replica sends `NOTIFY stead_changes`
//! (payload: its own name) when something changed, coalesced, and listens
//! on that channel. Long-polls also end on their own timeout, so a lost
//! notification only delays a change, never loses it.

use std::time::Duration;

use crate::AppState;

pub(crate) const CHANNEL: &str = "stead_changes";

/// Sends one NOTIFY per burst of local changes (at most one per 10 ms).
pub(crate) async fn notify_loop(state: AppState, mut rx: tokio::sync::mpsc::Receiver<()>) {
    while rx.recv().await.is_some() {
        if let Err(e) = state.store.notify(CHANNEL, &state.replica).await {
            tracing::debug!(error = %e, "could not notify the other replicas; their long-polls fall back to their timeouts");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Wakes this replica's long-polls when another replica notifies.
pub(crate) async fn listen_loop(state: AppState) {
    let mut delay = Duration::from_millis(200);
    loop {
        match listen(&state).await {
            Ok(()) => delay = Duration::from_millis(200),
            Err(e) => {
                tracing::warn!(error = %e, "listening for other replicas' changes failed; reconnecting");
            }
        }
        // Whatever was missed meanwhile: let the waiters look again.
        state.changes.notify_waiters();
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn listen(state: &AppState) -> Result<(), sqlx::Error> {
    let mut listener = sqlx::postgres::PgListener::connect(&state.config.database_url).await?;
    listener.listen(CHANNEL).await?;
    tracing::debug!(replica = %state.replica, "listening for other replicas' changes");
    loop {
        let n = listener.recv().await?;
        if n.payload() != &*state.replica {
            state.changes.notify_waiters();
        }
    }
}
