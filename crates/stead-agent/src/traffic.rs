//! Traffic into instances: the forwarder that gives each instance its
//! endpoint, keeping track of its connections, and draining an instance
//! before it is stopped so that no request in flight is cut off.
//!
//! The forwarder splices bytes without parsing HTTP, so "busy" is inferred
//! from the direction of the last bytes on each connection: a connection
//! whose last bytes went towards the app is waiting for an answer, and one
//! whose app sent bytes within the last [`QUIET`] may still be streaming
//! one. Any other connection is idle (a keep-alive connection of the
//! router's pool between requests).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Shared;

/// A connection whose app last sent bytes this recently may still be in
/// the middle of an answer.
pub(crate) const QUIET: Duration = Duration::from_millis(250);
/// Size of each direction's copy buffer.
const BUFFER: usize = 16 * 1024;

/// One forwarded connection.
#[derive(Debug)]
struct Conn {
    /// Sequence number (per instance) of the last read towards the app and
    /// from it: ordering them tells whether an answer is pending.
    last_in: AtomicU64,
    last_out: AtomicU64,
    /// When the app last sent bytes, in microseconds since the tracker's start.
    out_at_us: AtomicU64,
}

/// The connections of one instance's endpoint.
#[derive(Debug)]
pub(crate) struct ConnTracker {
    origin: Instant,
    seq: AtomicU64,
    conns: Mutex<Vec<Weak<Conn>>>,
    open: AtomicUsize,
    /// Connections accepted since the instance started.
    pub accepted: AtomicU64,
}

impl Default for ConnTracker {
    fn default() -> Self {
        ConnTracker {
            origin: Instant::now(),
            seq: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
            open: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
        }
    }
}

/// Keeps a connection counted as open until dropped.
struct Open(Arc<ConnTracker>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnTracker {
    fn now_us(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn register(self: &Arc<Self>) -> (Arc<Conn>, Open) {
        let c = Arc::new(Conn {
            last_in: AtomicU64::new(0),
            last_out: AtomicU64::new(0),
            out_at_us: AtomicU64::new(0),
        });
        {
            let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            // Drop the entries of closed connections as we go.
            conns.retain(|w| w.strong_count() > 0);
            conns.push(Arc::downgrade(&c));
        }
        self.open.fetch_add(1, Ordering::Relaxed);
        self.accepted.fetch_add(1, Ordering::Relaxed);
        (c, Open(self.clone()))
    }

    /// Open connections.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections that are (or may be) carrying a request: see the module doc.
    pub fn busy(&self) -> usize {
        let now = self.now_us();
        let quiet = u64::try_from(QUIET.as_micros()).unwrap_or(u64::MAX);
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|c| {
                let inbound = c.last_in.load(Ordering::Relaxed);
                let outbound = c.last_out.load(Ordering::Relaxed);
                inbound > outbound
                    || (outbound > 0
                        && now.saturating_sub(c.out_at_us.load(Ordering::Relaxed)) < quiet)
            })
            .count()
    }

    /// Splices `inbound` (from a router) and `upstream` (the app, inside
    /// its sandbox) until either side is done or fails.
    pub async fn splice(self: &Arc<Self>, inbound: TcpStream, upstream: TcpStream) {
        let (conn, _open) = self.register();
        let (mut ri, mut wi) = inbound.into_split();
        let (mut ru, mut wu) = upstream.into_split();
        let to_app = async {
            let mut buf = vec![0u8; BUFFER];
            loop {
                let n = ri.read(&mut buf).await?;
                if n == 0 {
                    // Half-close: the app sees the end of the request stream.
                    let _ = wu.shutdown().await;
                    return Ok::<(), std::io::Error>(());
                }
                conn.last_in.store(
                    self.seq.fetch_add(1, Ordering::Relaxed) + 1,
                    Ordering::Relaxed,
                );
                wu.write_all(&buf[..n]).await?;
            }
        };
        let to_router = async {
            let mut buf = vec![0u8; BUFFER];
            loop {
                let n = ru.read(&mut buf).await?;
                if n == 0 {
                    let _ = wi.shutdown().await;
                    return Ok::<(), std::io::Error>(());
                }
                conn.last_out.store(
                    self.seq.fetch_add(1, Ordering::Relaxed) + 1,
                    Ordering::Relaxed,
                );
                conn.out_at_us.store(self.now_us(), Ordering::Relaxed);
                wi.write_all(&buf[..n]).await?;
            }
        };
        // Like `copy_bidirectional`: done when both directions ended, or
        // at the first error (a reset), which ends the other one too.
        let _ = tokio::try_join!(to_app, to_router);
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drained {
    /// No request left in flight.
    Clean,
    /// The budget ran out with requests still in flight.
    TimedOut { busy: usize },
}

/// Drains instance `id` before it is stopped: waits until the control plane
/// has acknowledged a heartbeat reporting it as stopping (routers then drop
/// it from their tables, notified by long-poll), then for routers to apply
/// that (`propagation`), then until none of its connections is busy, all
/// within `budget`.
///
/// `mark` is the observation counter read when the instance was marked as
/// stopping: every observation numbered above it reports it as such.
pub(crate) async fn drain(
    shared: &Arc<Shared>,
    id: &str,
    tracker: &Arc<ConnTracker>,
    mark: u64,
    budget: Duration,
) -> Drained {
    let deadline = tokio::time::Instant::now() + budget;
    let mut acked = shared.telemetry.acked.subscribe();
    let _ = tokio::time::timeout_at(deadline, acked.wait_for(|a| *a > mark)).await;
    let propagation = shared.config.drain_propagation;
    tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + propagation)).await;
    loop {
        let busy = tracker.busy();
        if busy == 0 {
            return Drained::Clean;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(instance = %id, busy, "requests still in flight when the drain ran out; stopping anyway");
            return Drained::TimedOut { busy };
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A forwarder in front of an echo-ish "app" that answers each line
    /// after `delay`.
    async fn setup(delay: Duration) -> (Arc<ConnTracker>, std::net::SocketAddr) {
        let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app_addr = app.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = app.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    loop {
                        let n = match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        tokio::time::sleep(delay).await;
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let tracker = Arc::new(ConnTracker::default());
        let t = tracker.clone();
        tokio::spawn(async move {
            loop {
                let (inbound, _) = front.accept().await.unwrap();
                let upstream = TcpStream::connect(app_addr).await.unwrap();
                let t = t.clone();
                tokio::spawn(async move { t.splice(inbound, upstream).await });
            }
        });
        (tracker, front_addr)
    }

    #[tokio::test]
    async fn busy_follows_requests_and_idle_keep_alive_is_not_busy() {
        let (tracker, addr) = setup(Duration::from_millis(300)).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        // Connected, nothing sent: open but idle.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!((tracker.open(), tracker.busy()), (1, 0));
        // A request: busy until its answer has come and gone quiet.
        c.write_all(b"ping\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(tracker.busy(), 1);
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping\n");
        assert_eq!(tracker.busy(), 1, "just answered: may still stream");
        tokio::time::sleep(QUIET + Duration::from_millis(50)).await;
        assert_eq!(tracker.busy(), 0, "keep-alive between requests is idle");
        assert_eq!(tracker.open(), 1);
        drop(c);
        let deadline = Instant::now() + Duration::from_secs(5);
        while tracker.open() > 0 {
            assert!(Instant::now() < deadline, "connection never counted closed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(tracker.accepted.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn bytes_pass_both_ways_and_half_close_is_forwarded() {
        let (_tracker, addr) = setup(Duration::ZERO).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        let payload = vec![7u8; 64];
        c.write_all(&payload).await.unwrap();
        let mut back = vec![0u8; 64];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(back, payload);
        c.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
            .await
            .expect("the app's close reaches the client")
            .unwrap();
        assert_eq!(n, 0);
    }
}
