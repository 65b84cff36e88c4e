//! TCP connections into a sandbox's network namespace.
//!
//! A socket belongs to the network namespace its creator was in when it
//! called socket(2), and keeps it for life. So one dedicated OS thread
//! enters a sandbox's namespace with setns(2), creates a socket, returns to
//! the host namespace and hands the socket back; the connect itself happens
//! on tokio in the caller. Tokio's worker threads never change namespace
//! (they are shared by everything else the agent does).

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::{mpsc, Arc, Mutex};

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;

struct Request {
    netns: Arc<OwnedFd>,
    reply: oneshot::Sender<io::Result<OwnedFd>>,
}

/// The helper thread's inbox, started on first use.
static HELPER: Mutex<Option<mpsc::Sender<Request>>> = Mutex::new(None);

fn setns(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: setns(2) on a valid namespace fd, for the calling thread only.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn socket_in(netns: &OwnedFd, host: &OwnedFd) -> io::Result<OwnedFd> {
    setns(netns)?;
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    let sock = if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        // SAFETY: fresh descriptor from socket(2).
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    // Go back so that the sandbox's namespace is not kept alive by us.
    if let Err(e) = setns(host) {
        tracing::warn!(error = %e, "netns helper thread could not return to the host namespace");
    }
    sock
}

fn serve(rx: mpsc::Receiver<Request>, host: OwnedFd) {
    for req in rx {
        let _ = req.reply.send(socket_in(&req.netns, &host));
    }
}

fn helper() -> io::Result<mpsc::Sender<Request>> {
    let mut guard = HELPER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(tx) = guard.as_ref() {
        return Ok(tx.clone());
    }
    // Opened from a thread in the agent's (host) namespace.
    let host: OwnedFd = std::fs::File::open("/proc/thread-self/ns/net")?.into();
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("stead-netns".into())
        .spawn(move || serve(rx, host))?;
    *guard = Some(tx.clone());
    Ok(tx)
}

/// Creates an (unconnected, non-blocking) TCP socket inside `netns`.
async fn socket_inside(netns: &Arc<OwnedFd>) -> io::Result<OwnedFd> {
    let (reply, rx) = oneshot::channel();
    let req = Request {
        netns: Arc::clone(netns),
        reply,
    };
    if helper()?.send(req).is_err() {
        // The thread died (it never should): start a new one next time.
        *HELPER.lock().unwrap_or_else(|p| p.into_inner()) = None;
        return Err(io::Error::other("the netns helper thread has stopped"));
    }
    rx.await
        .map_err(|_| io::Error::other("the netns helper thread dropped the request"))?
}

/// A listening socket bound to 127.0.0.1:`port` inside `netns`. The socket
/// was created in the namespace, so it listens on the namespace's loopback;
/// bind and listen work from any thread (a socket keeps its namespace).
pub(crate) async fn listen_inside(netns: &Arc<OwnedFd>, port: u16) -> io::Result<TcpListener> {
    let fd = socket_inside(netns).await?;
    // SAFETY: fd is an AF_INET stream socket we own, in non-blocking mode.
    let socket = unsafe { TcpSocket::from_raw_fd(fd.into_raw_fd()) };
    // A port a previous listener used stays in TIME_WAIT for a while.
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
    socket.listen(1024)
}

/// Connects to 127.0.0.1:`port` inside `netns`.
pub(crate) async fn connect_inside(netns: &Arc<OwnedFd>, port: u16) -> io::Result<TcpStream> {
    let fd = socket_inside(netns).await?;
    // SAFETY: fd is an AF_INET stream socket we own, in non-blocking mode.
    let socket = unsafe { TcpSocket::from_raw_fd(fd.into_raw_fd()) };
    socket
        .connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .await
}
