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

use std::os::fd::AsRawFd;

use tokio::net::TcpStream;
use tokio::sync::watch;

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
    /// its sandbox) until either side is done or fails, or until the agent
    /// hands its connections over to a successor (`pause`): then both
    /// sockets come back, with nothing read and not yet written.
    pub async fn splice(
        self: &Arc<Self>,
        pair: Pair,
        pause: watch::Receiver<bool>,
    ) -> Option<Paired> {
        let (conn, _open) = self.register();
        if pair.pending {
            // Handed over while a request was waiting for its answer.
            conn.last_in.store(
                self.seq.fetch_add(1, Ordering::Relaxed) + 1,
                Ordering::Relaxed,
            );
        }
        let towards_app = || {
            conn.last_in.store(
                self.seq.fetch_add(1, Ordering::Relaxed) + 1,
                Ordering::Relaxed,
            );
        };
        let towards_router = || {
            conn.last_out.store(
                self.seq.fetch_add(1, Ordering::Relaxed) + 1,
                Ordering::Relaxed,
            );
            conn.out_at_us.store(self.now_us(), Ordering::Relaxed);
        };
        let paused = splice_with(pair, pause, towards_app, towards_router).await?;
        let last_in = conn.last_in.load(Ordering::Relaxed);
        let last_out = conn.last_out.load(Ordering::Relaxed);
        Some(Paired {
            pending: last_in > last_out,
            ..paused
        })
    }
}

/// Two connected sockets to splice, and what has already ended on each:
/// `a_done` means `a` sent its end (its bytes towards `b` are over and
/// `b`'s write side was shut down).
#[derive(Debug)]
pub(crate) struct Pair {
    pub a: TcpStream,
    pub b: TcpStream,
    pub a_done: bool,
    pub b_done: bool,
    /// Bytes went towards `b` (the app) that it has not answered yet.
    pub pending: bool,
}

impl Pair {
    pub fn new(a: TcpStream, b: TcpStream) -> Self {
        Pair {
            a,
            b,
            a_done: false,
            b_done: false,
            pending: false,
        }
    }
}

/// A splice stopped for a hand-over: the same sockets, as std ones so
/// they can be sent to another process.
#[derive(Debug)]
pub(crate) struct Paired {
    pub a: std::net::TcpStream,
    pub b: std::net::TcpStream,
    pub a_done: bool,
    pub b_done: bool,
    pub pending: bool,
}

enum End {
    Done,
    Paused,
}

/// Copies `from` to `to` until `from` ends (then shuts down `to`'s write
/// side), fails, or `pause` is raised. A pause is only taken between a
/// read and the next, once everything read has been written, so the bytes
/// in flight stay in the sockets' kernel buffers for the successor.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    mut pause: watch::Receiver<bool>,
    on_bytes: impl Fn(),
) -> std::io::Result<End> {
    let mut buf = vec![0u8; BUFFER];
    loop {
        tokio::select! {
            biased;
            _ = pause.wait_for(|p| *p) => return Ok(End::Paused),
            r = from.readable() => r?,
        }
        let n = match from.try_read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            // Half-close: the other side sees the end of this stream.
            let _ = nix::sys::socket::shutdown(to.as_raw_fd(), nix::sys::socket::Shutdown::Write);
            return Ok(End::Done);
        }
        on_bytes();
        let mut sent = 0;
        while sent < n {
            to.writable().await?;
            match to.try_write(&buf[sent..n]) {
                Ok(m) => sent += m,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Splices `pair.a` and `pair.b` both ways, like `copy_bidirectional`
/// (done when both directions ended, or at the first error, a reset, which
/// ends the other one too), but pausable: `Some` when paused, with the
/// sockets and what had ended.
pub(crate) async fn splice_with(
    pair: Pair,
    pause: watch::Receiver<bool>,
    a_to_b: impl Fn(),
    b_to_a: impl Fn(),
) -> Option<Paired> {
    let Pair {
        a,
        b,
        a_done,
        b_done,
        pending,
    } = pair;
    let forward = async {
        if a_done {
            return Ok(End::Done);
        }
        pump(&a, &b, pause.clone(), a_to_b).await
    };
    let backward = async {
        if b_done {
            return Ok(End::Done);
        }
        pump(&b, &a, pause.clone(), b_to_a).await
    };
    let (f, r) = tokio::try_join!(forward, backward).ok()?;
    if let (End::Done, End::Done) = (&f, &r) {
        return None;
    }
    Some(Paired {
        a: a.into_std().ok()?,
        b: b.into_std().ok()?,
        a_done: matches!(f, End::Done),
        b_done: matches!(r, End::Done),
        pending,
    })
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
                let (_keep, pause) = watch::channel(false);
                tokio::spawn(async move {
                    let _keep = _keep;
                    t.splice(Pair::new(inbound, upstream), pause).await
                });
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

    /// A pause in the middle of a stream both ways, then a new splice of
    /// the same sockets (what a successor agent does with the ones handed
    /// over): every byte arrives once, in order, and the end of the stream
    /// still passes.
    #[tokio::test]
    async fn a_paused_splice_resumes_without_losing_or_repeating_bytes() {
        // The "app" echoes everything back.
        let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app_addr = app.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = app.accept().await.unwrap();
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(front_addr).await.unwrap();
            let total: usize = 4 * 1024 * 1024;
            let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
            let (mut r, mut w) = c.split();
            let send = async {
                // Paced, so that the stream is still running at the pauses.
                for (i, chunk) in data.chunks(7 * 1024).enumerate() {
                    w.write_all(chunk).await.unwrap();
                    if i % 8 == 7 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                w.shutdown().await.unwrap();
            };
            let mut back = Vec::with_capacity(total);
            let recv = r.read_to_end(&mut back);
            let (_, n) = tokio::join!(send, recv);
            n.unwrap();
            assert_eq!(back.len(), total, "bytes lost or repeated");
            assert!(back == data, "bytes out of order or corrupted");
        });
        let (inbound, _) = front.accept().await.unwrap();
        let upstream = TcpStream::connect(app_addr).await.unwrap();
        let tracker = Arc::new(ConnTracker::default());
        let mut pair = Pair::new(inbound, upstream);
        let mut pauses = 0;
        // Pause and resume a bounded number of times while the stream runs.
        loop {
            let (tx, rx) = watch::channel(false);
            let t = tracker.clone();
            let task = tokio::spawn(async move { t.splice(pair, rx).await });
            tokio::time::sleep(Duration::from_millis(15)).await;
            tx.send_replace(true);
            let paused = tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("a pause is taken promptly")
                .unwrap();
            let Some(p) = paused else {
                break;
            };
            pauses += 1;
            assert!(pauses < 500, "the stream never ended");
            pair = Pair {
                a: TcpStream::from_std(p.a).unwrap(),
                b: TcpStream::from_std(p.b).unwrap(),
                a_done: p.a_done,
                b_done: p.b_done,
                pending: p.pending,
            };
            if p.a_done && p.b_done {
                break;
            }
            if pauses > 3 {
                // Let it run to the end without further pauses.
                let (_tx, rx) = watch::channel(false);
                assert!(tracker.splice(pair, rx).await.is_none());
                break;
            }
        }
        assert!(pauses >= 1, "the splice was never paused mid-stream");
        tokio::time::timeout(Duration::from_secs(20), client)
            .await
            .expect("the client finished")
            .unwrap();
    }
}
