//! Hand-over between two agent processes of one host, so that replacing the
//! agent's binary cuts no connection and refuses none.
//!
//! The instances themselves survive any agent restart (they are adopted
//! from their records), but their endpoints are sockets of the agent
//! process: the listeners the routers connect to, the connections being
//! forwarded into the sandboxes, and the relays of the app's database
//! inside them. A plain restart closes all of them, which fails the
//! requests in flight and refuses new ones until the next process has
//! bound the ports again. So a new agent started on a data directory whose
//! agent is still running asks it, over a Unix socket in that directory,
//! to hand over: the running agent stops its loops, pauses every forwarder
//! at a point where nothing it read is left unwritten, and sends every
//! listener and connection (SCM_RIGHTS) to the new one, which resumes them
//! where they were. Bytes that arrive meanwhile wait in the sockets' kernel
//! buffers and connection attempts in the listeners' backlogs, so no peer
//! sees anything but a pause of a few milliseconds.
//!
//! An exclusive lock on `agent.lock` in the data directory makes sure that
//! only one agent acts on it at a time: the new one takes the lock only
//! once the old one has handed over and let it go.

use std::collections::HashMap;
use std::fs::File;
use std::io::{IoSlice, IoSliceMut, Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use nix::sys::socket::{
    self, sockopt, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use nix::sys::time::TimeVal;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::{watch, Notify};

use crate::traffic::Paired;

/// File descriptors per message: below the kernel's limit (SCM_MAX_FD, 253).
const FDS_PER_MESSAGE: usize = 200;
/// Largest message: a chunk's description of what its descriptors are.
const MESSAGE_BYTES: usize = 256 * 1024;
/// How long each side waits for the other at each step.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new agent waits for the old one to let go of the lock after
/// handing over (it only ships its last log lines meanwhile).
const LOCK_WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{op} on the hand-over socket {path}: {source}")]
    Socket {
        op: &'static str,
        path: PathBuf,
        source: nix::Error,
    },
    #[error("another agent (pid {pid}) runs on data directory {dir} and did not hand over to this one ({reason}); stop it, or wait until it has exited, then start this agent again")]
    Busy {
        pid: String,
        dir: PathBuf,
        reason: String,
    },
    #[error("hand-over protocol error on {path}: {reason}")]
    Protocol { path: PathBuf, reason: String },
}

/// What a forwarder is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub(crate) enum Role {
    /// The instance's endpoint (routers connect to it).
    Endpoint,
    /// A host service exposed inside the instance (`host:port`).
    Expose { target: String },
}

/// A socket being handed over.
#[derive(Debug)]
pub(crate) enum Item {
    Listener {
        instance: String,
        role: Role,
        listener: std::net::TcpListener,
    },
    Conn {
        instance: String,
        role: Role,
        paired: Paired,
    },
}

/// What an instance's forwarders receive from the previous agent.
#[derive(Debug, Default)]
pub(crate) struct Inherited {
    pub endpoint: Option<std::net::TcpListener>,
    pub expose: HashMap<String, std::net::TcpListener>,
    pub conns: Vec<(Role, Paired)>,
}

/// Where an agent's forwarders meet a hand-over: the pause signal, the
/// count of forwarders still running, what they handed in, and what the
/// previous agent handed to this one.
#[derive(Debug)]
pub(crate) struct Hub {
    pause: watch::Sender<bool>,
    live: AtomicUsize,
    idle: Notify,
    collected: Mutex<Vec<Item>>,
    inherited: Mutex<HashMap<String, Inherited>>,
}

/// Counts a forwarder (accept loop or connection) as running while held.
pub(crate) struct Ticket(Arc<Hub>);

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Hub {
    pub fn new(inherited: HashMap<String, Inherited>) -> Arc<Hub> {
        Arc::new(Hub {
            pause: watch::channel(false).0,
            live: AtomicUsize::new(0),
            idle: Notify::new(),
            collected: Mutex::new(Vec::new()),
            inherited: Mutex::new(inherited),
        })
    }

    pub fn pause_signal(&self) -> watch::Receiver<bool> {
        self.pause.subscribe()
    }

    pub fn ticket(self: &Arc<Self>) -> Ticket {
        self.live.fetch_add(1, Ordering::AcqRel);
        Ticket(self.clone())
    }

    /// A paused forwarder's sockets, for the successor.
    pub fn put(&self, item: Item) {
        self.collected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(item);
    }

    /// What the previous agent handed over for instance `id`.
    pub fn take_inherited(&self, id: &str) -> Inherited {
        self.inherited
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
            .unwrap_or_default()
    }

    /// Ids of the instances something was handed over for and not yet taken.
    pub fn drop_unclaimed(&self) -> Vec<String> {
        let mut inherited = self.inherited.lock().unwrap_or_else(|p| p.into_inner());
        let ids = inherited.keys().cloned().collect();
        // Sockets of instances that are gone: closing them is all there is.
        inherited.clear();
        ids
    }

    /// Pauses every forwarder and waits (up to `budget`) until each has
    /// handed its sockets in; returns how many did not in time (a
    /// connection whose peer stopped reading mid-write), which are cut.
    pub async fn pause_all(&self, budget: Duration) -> usize {
        self.pause.send_replace(true);
        let deadline = tokio::time::Instant::now() + budget;
        loop {
            let idle = self.idle.notified();
            let live = self.live.load(Ordering::Acquire);
            if live == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.live.load(Ordering::Acquire);
            }
        }
    }

    pub fn take_collected(&self) -> Vec<Item> {
        std::mem::take(&mut *self.collected.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The exclusive right to act on a data directory; released when dropped
/// (or when the process exits, however it exits).
#[derive(Debug)]
pub(crate) struct DataDirLock {
    _lock: Flock<File>,
}

fn lock_path(dir: &Path) -> PathBuf {
    dir.join("agent.lock")
}

pub(crate) fn socket_path(dir: &Path) -> PathBuf {
    dir.join("agent.sock")
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HandoverError + '_ {
    move |source| HandoverError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn try_lock(dir: &Path) -> Result<Result<DataDirLock, String>, HandoverError> {
    let path = lock_path(dir);
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(&path))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            // Who holds it, for the error another agent would print.
            lock.set_len(0).map_err(io_err(&path))?;
            lock.rewind().map_err(io_err(&path))?;
            write!(lock, "{}", std::process::id()).map_err(io_err(&path))?;
            Ok(Ok(DataDirLock { _lock: lock }))
        }
        Err((mut file, nix::Error::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            Ok(Err(pid.trim().to_string()))
        }
        Err((_, e)) => Err(HandoverError::Io {
            path,
            source: e.into(),
        }),
    }
}

/// Takes the data directory's lock; when another agent holds it, asks that
/// agent to hand over first. Returns what was handed over, by instance id.
pub(crate) async fn acquire(
    dir: &Path,
    host: &str,
) -> Result<(DataDirLock, HashMap<String, Inherited>), HandoverError> {
    let pid = match try_lock(dir)? {
        Ok(lock) => return Ok((lock, HashMap::new())),
        Err(pid) => pid,
    };
    tracing::info!(host, pid = %pid, dir = %dir.display(), "another agent runs on this data directory; asking it to hand over");
    let path = socket_path(dir);
    let items = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || receive(&path))
            .await
            .map_err(|e| HandoverError::Protocol {
                path: socket_path(dir),
                reason: e.to_string(),
            })?
    }
    .map_err(|e| HandoverError::Busy {
        pid: pid.clone(),
        dir: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut inherited: HashMap<String, Inherited> = HashMap::new();
    let (mut listeners, mut conns) = (0, 0);
    for item in items {
        match item {
            Item::Listener {
                instance,
                role,
                listener,
            } => {
                listeners += 1;
                let entry = inherited.entry(instance).or_default();
                match role {
                    Role::Endpoint => entry.endpoint = Some(listener),
                    Role::Expose { target } => {
                        entry.expose.insert(target, listener);
                    }
                }
            }
            Item::Conn {
                instance,
                role,
                paired,
            } => {
                conns += 1;
                inherited
                    .entry(instance)
                    .or_default()
                    .conns
                    .push((role, paired));
            }
        }
    }
    // The old agent lets go of the lock as it exits, right after.
    let deadline = tokio::time::Instant::now() + LOCK_WAIT;
    loop {
        if let Ok(lock) = try_lock(dir)? {
            tracing::info!(host, from_pid = %pid, listeners, connections = conns, "took over from the previous agent");
            return Ok((lock, inherited));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(HandoverError::Busy {
                pid,
                dir: dir.to_path_buf(),
                reason: format!(
                    "it handed over but still held the lock after {} s",
                    LOCK_WAIT.as_secs()
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The description of one message's descriptors.
#[derive(Debug, Serialize, Deserialize)]
struct Chunk {
    items: Vec<Entry>,
    last: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    instance: String,
    #[serde(flatten)]
    role: Role,
    /// `None` for a listener (one descriptor), else a connection (two).
    conn: Option<ConnState>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ConnState {
    a_done: bool,
    b_done: bool,
    pending: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Request {
    Takeover { pid: u32 },
    Received { items: usize },
}

fn seqpacket(path: &Path) -> Result<OwnedFd, HandoverError> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|source| HandoverError::Socket {
        op: "socket",
        path: path.to_path_buf(),
        source,
    })
}

fn sock_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> HandoverError + 'a {
    move |source| HandoverError::Socket {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn set_timeouts(fd: &OwnedFd, path: &Path) -> Result<(), HandoverError> {
    let t = TimeVal::new(STEP_TIMEOUT.as_secs() as i64, 0);
    socket::setsockopt(fd, sockopt::ReceiveTimeout, &t).map_err(sock_err("SO_RCVTIMEO", path))?;
    socket::setsockopt(fd, sockopt::SendTimeout, &t).map_err(sock_err("SO_SNDTIMEO", path))
}

fn send_json<T: Serialize>(
    fd: &OwnedFd,
    path: &Path,
    value: &T,
    fds: &[RawFd],
) -> Result<(), HandoverError> {
    let bytes = serde_json::to_vec(value).map_err(|e| HandoverError::Protocol {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let iov = [IoSlice::new(&bytes)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    socket::sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
        .map_err(sock_err("sendmsg", path))?;
    Ok(())
}

fn recv_json<T: for<'de> Deserialize<'de>>(
    fd: &OwnedFd,
    path: &Path,
) -> Result<(T, Vec<OwnedFd>), HandoverError> {
    let mut buf = vec![0u8; MESSAGE_BYTES];
    let mut cmsg = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
    let (len, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = socket::recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(sock_err("recvmsg", path))?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(sock_err("recvmsg", path))? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these descriptors in this
                // process for this message; nothing else owns them.
                fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
            }
        }
        if msg.flags.contains(MsgFlags::MSG_TRUNC) || msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(HandoverError::Protocol {
                path: path.to_path_buf(),
                reason: "message truncated".into(),
            });
        }
        (msg.bytes, fds)
    };
    if len == 0 {
        return Err(HandoverError::Protocol {
            path: path.to_path_buf(),
            reason: "the other agent closed the connection".into(),
        });
    }
    let value = serde_json::from_slice(&buf[..len]).map_err(|e| HandoverError::Protocol {
        path: path.to_path_buf(),
        reason: format!("bad message: {e}"),
    })?;
    Ok((value, fds))
}

/// The new agent's side: asks, receives everything, acknowledges.
fn receive(path: &Path) -> Result<Vec<Item>, HandoverError> {
    let fd = seqpacket(path)?;
    let addr = UnixAddr::new(path).map_err(sock_err("address", path))?;
    socket::connect(fd.as_raw_fd(), &addr).map_err(sock_err("connect", path))?;
    set_timeouts(&fd, path)?;
    send_json(
        &fd,
        path,
        &Request::Takeover {
            pid: std::process::id(),
        },
        &[],
    )?;
    let mut items = Vec::new();
    loop {
        let (chunk, fds): (Chunk, Vec<OwnedFd>) = recv_json(&fd, path)?;
        let needed: usize = chunk
            .items
            .iter()
            .map(|e| if e.conn.is_some() { 2 } else { 1 })
            .sum();
        if needed != fds.len() {
            return Err(HandoverError::Protocol {
                path: path.to_path_buf(),
                reason: format!("{} descriptors for {needed}", fds.len()),
            });
        }
        let mut fds = fds.into_iter();
        for entry in chunk.items {
            let (Some(first), conn) = (fds.next(), entry.conn) else {
                break;
            };
            match conn {
                None => items.push(Item::Listener {
                    instance: entry.instance,
                    role: entry.role,
                    listener: std::net::TcpListener::from(first),
                }),
                Some(state) => {
                    let Some(second) = fds.next() else { break };
                    items.push(Item::Conn {
                        instance: entry.instance,
                        role: entry.role,
                        paired: Paired {
                            a: std::net::TcpStream::from(first),
                            b: std::net::TcpStream::from(second),
                            a_done: state.a_done,
                            b_done: state.b_done,
                            pending: state.pending,
                        },
                    })
                }
            }
        }
        if chunk.last {
            break;
        }
    }
    send_json(&fd, path, &Request::Received { items: items.len() }, &[])?;
    Ok(items)
}

/// Listens for a successor on the data directory's hand-over socket.
/// Only the lock holder calls this, so a socket file left there is stale.
pub(crate) fn listen(dir: &Path, _lock: &DataDirLock) -> Result<AsyncFd<OwnedFd>, HandoverError> {
    let path = socket_path(dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&path)(e)),
    }
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(sock_err("socket", &path))?;
    let addr = UnixAddr::new(&path).map_err(sock_err("address", &path))?;
    socket::bind(fd.as_raw_fd(), &addr).map_err(sock_err("bind", &path))?;
    // Only this user's processes may take the host's connections over.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(&path))?;
    socket::listen(
        &fd,
        socket::Backlog::new(4).map_err(sock_err("listen", &path))?,
    )
    .map_err(sock_err("listen", &path))?;
    // SAFETY: the OwnedFd is moved into the AsyncFd, so the descriptor
    // stays open and the same for the AsyncFd's whole life.
    unsafe { AsyncFd::register(fd) }
        .map_err(|e| io_err(&path)(std::io::Error::other(e.to_string())))
}

/// A successor that asked to take over, connected.
pub(crate) struct Successor {
    fd: OwnedFd,
    pub pid: u32,
    path: PathBuf,
}

/// Waits for a process of this user to ask for a hand-over; anything else
/// connecting is ignored.
pub(crate) async fn wait_for_successor(listener: &AsyncFd<OwnedFd>, dir: &Path) -> Successor {
    let path = socket_path(dir);
    loop {
        let accepted = listener
            .async_io(tokio::io::Interest::READABLE, |fd| {
                socket::accept4(fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC)
                    .map_err(std::io::Error::from)
            })
            .await;
        let Ok(raw) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let checked = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || -> Result<Successor, HandoverError> {
                let cred = socket::getsockopt(&fd, sockopt::PeerCredentials)
                    .map_err(sock_err("SO_PEERCRED", &path))?;
                if cred.uid() != nix::unistd::getuid().as_raw() {
                    return Err(HandoverError::Protocol {
                        path: path.clone(),
                        reason: format!("refused a hand-over to uid {}", cred.uid()),
                    });
                }
                set_timeouts(&fd, &path)?;
                match recv_json::<Request>(&fd, &path)?.0 {
                    Request::Takeover { pid } => Ok(Successor { fd, pid, path }),
                    other => Err(HandoverError::Protocol {
                        path: path.clone(),
                        reason: format!("unexpected {other:?}"),
                    }),
                }
            })
            .await
        };
        match checked {
            Ok(Ok(s)) => return s,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "ignored a connection on the hand-over socket")
            }
            Err(e) => tracing::warn!(error = %e, "ignored a connection on the hand-over socket"),
        }
    }
}

/// The old agent's side: sends every item, waits for the acknowledgement.
pub(crate) async fn hand_over(
    successor: Successor,
    items: Vec<Item>,
) -> Result<usize, HandoverError> {
    let path = successor.path.clone();
    tokio::task::spawn_blocking(move || send_all(&successor, items))
        .await
        .map_err(|e| HandoverError::Protocol {
            path,
            reason: e.to_string(),
        })?
}

fn send_all(successor: &Successor, items: Vec<Item>) -> Result<usize, HandoverError> {
    let path = &successor.path;
    let total = items.len();
    let mut chunk: Vec<Entry> = Vec::new();
    // Kept open until sent: each descriptor is closed here after the
    // kernel has given the successor its own.
    let mut held: Vec<OwnedFd> = Vec::new();
    let mut items = items.into_iter().peekable();
    loop {
        let next = items.next();
        if let Some(item) = next {
            match item {
                Item::Listener {
                    instance,
                    role,
                    listener,
                } => {
                    chunk.push(Entry {
                        instance,
                        role,
                        conn: None,
                    });
                    held.push(OwnedFd::from(listener));
                }
                Item::Conn {
                    instance,
                    role,
                    paired,
                } => {
                    chunk.push(Entry {
                        instance,
                        role,
                        conn: Some(ConnState {
                            a_done: paired.a_done,
                            b_done: paired.b_done,
                            pending: paired.pending,
                        }),
                    });
                    held.push(OwnedFd::from(paired.a));
                    held.push(OwnedFd::from(paired.b));
                }
            }
        }
        let last = items.peek().is_none();
        if last || held.len() + 2 > FDS_PER_MESSAGE {
            let raw: Vec<RawFd> = held.iter().map(|f| f.as_fd().as_raw_fd()).collect();
            send_json(
                &successor.fd,
                path,
                &Chunk {
                    items: std::mem::take(&mut chunk),
                    last,
                },
                &raw,
            )?;
            held.clear();
        }
        if last {
            break;
        }
    }
    match recv_json::<Request>(&successor.fd, path)?.0 {
        Request::Received { items } if items == total => Ok(total),
        other => Err(HandoverError::Protocol {
            path: path.clone(),
            reason: format!("the successor acknowledged {other:?} of {total}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Both sides in one process over the real socket: a listener with a
    /// connection waiting in its backlog, and an established connection
    /// with bytes in flight, arrive working; a second agent cannot take
    /// the lock while the first holds it.
    #[tokio::test]
    async fn listeners_and_connections_survive_the_hand_over() {
        let dir = tempfile::tempdir().unwrap();
        let (lock, inherited) = acquire(dir.path(), "h").await.unwrap();
        assert!(inherited.is_empty());
        let server = listen(dir.path(), &lock).unwrap();

        // What the old agent has: a listener (with a connection queued in
        // its backlog) and a spliced pair with unread bytes.
        let endpoint = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        endpoint.set_nonblocking(true).unwrap();
        let endpoint_addr = endpoint.local_addr().unwrap();
        let mut queued = tokio::net::TcpStream::connect(endpoint_addr).await.unwrap();
        let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(app.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = app.accept().await.unwrap();
        client.write_all(b"in flight").await.unwrap();

        let old = {
            let dir = dir.path().to_path_buf();
            tokio::spawn(async move {
                let successor = wait_for_successor(&server, &dir).await;
                assert_eq!(successor.pid, std::process::id());
                let items = vec![
                    Item::Listener {
                        instance: "i1".into(),
                        role: Role::Endpoint,
                        listener: endpoint,
                    },
                    Item::Conn {
                        instance: "i1".into(),
                        role: Role::Expose {
                            target: "127.0.0.1:5432".into(),
                        },
                        paired: Paired {
                            a: accepted.into_std().unwrap(),
                            b: std::net::TcpStream::connect(endpoint_addr).unwrap(),
                            a_done: false,
                            b_done: true,
                            pending: true,
                        },
                    },
                ];
                let sent = hand_over(successor, items).await.unwrap();
                drop(lock);
                sent
            })
        };
        let (lock2, mut inherited) = acquire(dir.path(), "h").await.unwrap();
        assert_eq!(old.await.unwrap(), 2);
        let mut got = inherited.remove("i1").unwrap();
        // The queued connection is accepted by the new owner of the listener.
        let listener = tokio::net::TcpListener::from_std(got.endpoint.take().unwrap()).unwrap();
        let (mut q, _) = listener.accept().await.unwrap();
        queued.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        q.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        // The connection's unread bytes are still there, its state kept.
        let (role, paired) = got.conns.pop().unwrap();
        assert_eq!(
            role,
            Role::Expose {
                target: "127.0.0.1:5432".into()
            }
        );
        assert!(!paired.a_done && paired.b_done && paired.pending);
        let mut a = tokio::net::TcpStream::from_std(paired.a).unwrap();
        let mut buf = [0u8; 9];
        a.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"in flight");
        // A third agent cannot act while the second holds the lock, and
        // says who holds it.
        match try_lock(dir.path()).unwrap() {
            Ok(_) => panic!("two agents held the lock"),
            Err(pid) => assert_eq!(pid, std::process::id().to_string()),
        }
        drop(lock2);
    }

    /// A lock held by an agent that does not answer on the socket: the new
    /// one refuses to start, naming the holder.
    #[tokio::test]
    async fn an_agent_that_does_not_hand_over_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (_lock, _) = acquire(dir.path(), "h").await.unwrap();
        let err = acquire(dir.path(), "h").await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id()))
                && text.contains("did not hand over"),
            "{text}"
        );
    }
}
