//! Handing the listening sockets from a running router to its replacement,
//! so that a router can be upgraded without refusing a connection.
//!
//! A router listens on a Unix socket (the *hand-over socket*, a path derived
//! from its listen address) besides its TCP port. A new router started for
//! the same address connects to it first; the running one sends its TCP
//! listening sockets over it (SCM_RIGHTS), and the new one serves on those
//! very sockets. Because the kernel's listening socket never closes, no
//! connection is refused and nothing waiting in its accept backlog is lost:
//! it is accepted by whichever process calls `accept` next. Once the new
//! router serves (its route table loaded), it says so, and only then does the
//! old one stop accepting and drain.
//!
//! The exchange, on a stream socket:
//! - successor → predecessor: `stead-router-handover 1\n`
//! - predecessor → successor: `stead-router-handover 1 netns=N addr=A n=K\n`
//!   with the K listening sockets attached
//! - successor → predecessor, once it serves: `ready\n`
//!
//! If the successor goes away before `ready`, the predecessor keeps serving
//! (and listening for another successor) as if nothing happened.

use std::io::{IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};

/// What either side says first; a version bump makes old and new routers
/// refuse each other rather than misread each other.
const HELLO: &str = "stead-router-handover 1";
const READY: &[u8] = b"ready\n";
/// The kernel's limit on descriptors in one SCM_RIGHTS message
/// (`SCM_MAX_FD`); routers never run this many listeners.
pub(crate) const MAX_LISTENERS: usize = 253;
/// Bound on each step of the exchange while it is only bytes on a local
/// socket (the hellos).
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a predecessor waits for its successor to say it serves. The
/// successor loads its route table first (bounded by its own wait), so this
/// is generous: until then both serve, which is harmless.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest line either side sends.
const MAX_LINE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("hand-over socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("hand-over socket {path}: {message}")]
    Protocol { path: PathBuf, message: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HandoverError + '_ {
    move |source| HandoverError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn protocol(path: &Path, message: impl Into<String>) -> HandoverError {
    HandoverError::Protocol {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The network namespace this process is in: a socket passed between
/// namespaces would listen in the wrong one, so both sides compare it.
fn netns_id() -> u64 {
    std::fs::metadata("/proc/self/ns/net").map_or(0, |m| m.ino())
}

/// Where a router listening on `listen` puts its hand-over socket unless told
/// otherwise: `$XDG_RUNTIME_DIR/stead`, else `/run/stead` for root, else
/// `/tmp/stead-UID`; named after the network namespace and the address, so
/// routers on different addresses (or the same address in different network
/// namespaces) never meet.
pub fn default_socket_path(listen: SocketAddr) -> PathBuf {
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("stead"),
        None if nix::unistd::geteuid().is_root() => PathBuf::from("/run/stead"),
        None => std::env::temp_dir().join(format!("stead-{}", nix::unistd::geteuid())),
    };
    let addr = format!("{}-{}", listen.ip(), listen.port()).replace(':', "_");
    dir.join(format!("router-{}-{addr}.sock", netns_id()))
}

/// Makes the socket's directory (only we may enter it: whoever can connect
/// to the socket can take our listeners) and refuses one someone else owns.
fn prepare_dir(path: &Path) -> Result<(), HandoverError> {
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(path))?;
    }
    let meta = std::fs::metadata(dir).map_err(io_err(path))?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me && me != 0 {
        return Err(protocol(
            path,
            format!(
                "its directory {} belongs to user {}, not to us ({me}); give another path",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    Ok(())
}

/// Reads one `\n`-terminated line, at most [`MAX_LINE`] bytes.
async fn read_line(stream: &mut UnixStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        if line.len() >= MAX_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "line too long",
            ));
        }
        line.push(byte[0]);
    }
}

async fn timed<T>(
    what: &str,
    wait: Duration,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout(wait, f).await.unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{what} took longer than {}s", wait.as_secs()),
        ))
    })
}

/// A running router that handed us its listeners and waits for us to serve.
pub(crate) struct Predecessor {
    stream: UnixStream,
    path: PathBuf,
}

impl Predecessor {
    /// Tells the predecessor we serve: it stops accepting and drains.
    pub async fn release(mut self) -> Result<(), HandoverError> {
        timed("telling the old router", STEP_TIMEOUT, async {
            self.stream.write_all(READY).await?;
            self.stream.flush().await
        })
        .await
        .map_err(io_err(&self.path))
    }
}

/// Asks the router at `path` (if any) for its listening sockets. `Ok(None)`
/// when no router answers there (no socket, or a stale one of a router that
/// is gone). The listeners are checked to be listening TCP sockets on
/// `listen` (any address when its port is 0).
pub(crate) async fn take_over(
    path: &Path,
    listen: SocketAddr,
) -> Result<Option<(Predecessor, Vec<std::net::TcpListener>)>, HandoverError> {
    let mut stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(io_err(path)(e)),
    };
    timed("greeting the old router", STEP_TIMEOUT, async {
        stream.write_all(format!("{HELLO}\n").as_bytes()).await
    })
    .await
    .map_err(io_err(path))?;

    let (line, fds) = timed("receiving the listeners", STEP_TIMEOUT, recv_fds(&stream))
        .await
        .map_err(io_err(path))?;
    // Owned at once, so every error path below closes them.
    let fds: Vec<OwnedFd> = fds
        .into_iter()
        // SAFETY: each descriptor was just installed in this process by
        // recvmsg (SCM_RIGHTS) and nothing else refers to it.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();

    let Some(rest) = line.strip_prefix(HELLO) else {
        return Err(protocol(
            path,
            format!("the router there speaks another hand-over protocol ({line:?})"),
        ));
    };
    let mut netns = None;
    let mut count = None;
    for field in rest.split_whitespace() {
        if let Some(v) = field.strip_prefix("netns=") {
            netns = v.parse::<u64>().ok();
        } else if let Some(v) = field.strip_prefix("n=") {
            count = v.parse::<usize>().ok();
        }
    }
    if netns != Some(netns_id()) {
        return Err(protocol(
            path,
            "the router there runs in another network namespace; give another --handover-socket",
        ));
    }
    if count != Some(fds.len()) || fds.is_empty() {
        return Err(protocol(
            path,
            format!(
                "announced {count:?} listening sockets, {} arrived",
                fds.len()
            ),
        ));
    }
    let mut listeners = Vec::with_capacity(fds.len());
    for fd in fds {
        let accepting = getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false);
        let listener = std::net::TcpListener::from(fd);
        let addr = listener.local_addr().map_err(io_err(path))?;
        if !accepting || (listen.port() != 0 && addr != listen) {
            return Err(protocol(
                path,
                format!(
                    "the router there listens on {addr}, not on {listen}; give another --handover-socket"
                ),
            ));
        }
        listeners.push(listener);
    }
    Ok(Some((
        Predecessor {
            stream,
            path: path.to_path_buf(),
        },
        listeners,
    )))
}

/// Receives one line and the descriptors attached to it.
async fn recv_fds(stream: &UnixStream) -> std::io::Result<(String, Vec<RawFd>)> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    loop {
        let mut buf = [0u8; MAX_LINE];
        let (n, got) = stream
            .async_io(Interest::READABLE, || {
                let mut cmsg = nix::cmsg_space!([RawFd; MAX_LISTENERS]);
                let mut iov = [IoSliceMut::new(&mut buf)];
                let msg = recvmsg::<()>(
                    stream.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )?;
                let mut got = Vec::new();
                for c in msg.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(f) = c {
                        got.extend(f);
                    }
                }
                Ok((msg.bytes, got))
            })
            .await?;
        fds.extend(got);
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        line.extend_from_slice(&buf[..n]);
        if let Some(end) = line.iter().position(|b| *b == b'\n') {
            line.truncate(end);
            return Ok((String::from_utf8_lossy(&line).into_owned(), fds));
        }
        if line.len() > MAX_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "line too long",
            ));
        }
    }
}

/// The listening side: offers this router's listeners to a successor.
pub(crate) struct Offer {
    path: PathBuf,
    listener: UnixListener,
    /// (device, inode) of the socket file we made, to tell it from a
    /// successor's at the same path.
    ident: (u64, u64),
    /// Duplicates of the TCP listeners (the same kernel sockets).
    fds: Vec<OwnedFd>,
}

fn ident_of(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

fn bind_unix(path: &Path) -> Result<(UnixListener, (u64, u64)), HandoverError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(path)(e)),
    }
    let listener = UnixListener::bind(path).map_err(io_err(path))?;
    let ident = ident_of(path)
        .ok_or_else(|| protocol(path, "the socket vanished right after it was made"))?;
    Ok((listener, ident))
}

impl Offer {
    /// Listens at `path` (replacing any socket file there: a predecessor that
    /// answered has handed over; one that did not is gone).
    pub fn bind(path: &Path, listeners: &[std::net::TcpListener]) -> Result<Offer, HandoverError> {
        prepare_dir(path)?;
        let fds = listeners
            .iter()
            .map(|l| l.try_clone().map(OwnedFd::from))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(io_err(path))?;
        let (listener, ident) = bind_unix(path)?;
        Ok(Offer {
            path: path.to_path_buf(),
            listener,
            ident,
            fds,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves successors until one has taken the listeners and serves on
    /// them; then returns (the caller drains). A successor that fails
    /// half-way changes nothing.
    pub async fn hand_over(&mut self) {
        loop {
            let (mut stream, _) = match self.listener.accept().await {
                Ok(s) => s,
                Err(error) => {
                    tracing::warn!(path = %self.path.display(), %error, "hand-over accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match self.offer(&mut stream).await {
                Ok(()) => {
                    tracing::info!(path = %self.path.display(),
                        "a new router took over the listening sockets; draining");
                    return;
                }
                Err(error) => {
                    tracing::warn!(path = %self.path.display(), %error,
                        "a new router did not take over; still serving");
                    // It may have replaced our socket file before failing.
                    if ident_of(&self.path) != Some(self.ident) {
                        match bind_unix(&self.path) {
                            Ok((l, ident)) => {
                                self.listener = l;
                                self.ident = ident;
                            }
                            Err(error) => {
                                tracing::error!(%error, "cannot listen for a new router again; \
                                    this router can only be stopped, not handed over");
                                std::future::pending::<()>().await;
                            }
                        }
                    }
                }
            }
        }
    }

    async fn offer(&self, stream: &mut UnixStream) -> std::io::Result<()> {
        let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
        let cred = stream.peer_cred()?;
        let me = nix::unistd::geteuid().as_raw();
        if cred.uid() != me && cred.uid() != 0 {
            return Err(invalid(format!(
                "refused a process of user {} (we are {me})",
                cred.uid()
            )));
        }
        let hello = timed("the greeting", STEP_TIMEOUT, read_line(stream)).await?;
        if hello != HELLO {
            return Err(invalid(format!(
                "it speaks another hand-over protocol ({hello:?})"
            )));
        }
        let addr = self
            .fds
            .first()
            .and_then(|fd| {
                nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(fd.as_raw_fd())
                    .ok()
            })
            .map(|a| a.to_string())
            .unwrap_or_default();
        let line = format!(
            "{HELLO} netns={} addr={addr} n={}\n",
            netns_id(),
            self.fds.len()
        );
        let raw: Vec<RawFd> = self.fds.iter().map(|f| f.as_raw_fd()).collect();
        timed("sending the listeners", STEP_TIMEOUT, async {
            stream
                .async_io(Interest::WRITABLE, || {
                    let iov = [IoSlice::new(line.as_bytes())];
                    let cmsg = [ControlMessage::ScmRights(&raw)];
                    let sent =
                        sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)?;
                    Ok(sent)
                })
                .await
        })
        .await
        .and_then(|sent| {
            // One small message on a local stream socket goes out whole; a
            // short write would leave the successor a torn line.
            if sent == line.len() {
                Ok(())
            } else {
                Err(invalid(format!(
                    "short write ({sent} of {} bytes)",
                    line.len()
                )))
            }
        })?;
        let ready = timed("the new router starting", READY_TIMEOUT, read_line(stream)).await?;
        if ready.as_bytes() != &READY[..READY.len() - 1] {
            return Err(invalid(format!("unexpected answer {ready:?}")));
        }
        Ok(())
    }

    /// Removes the socket file, unless a successor's has replaced it.
    pub fn remove(&self) {
        if ident_of(&self.path) == Some(self.ident) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
