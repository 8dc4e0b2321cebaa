//! The built-in transparent TCP relay (the `proxy` datapath, and the
//! default proxy of `redirect` and `tproxy`).
//!
//! Architecture: one tokio event loop with a worker per core holds every
//! connection as a task. Each direction starts by copying through a small
//! buffer (short exchanges then cost no pipes); once a read fills the whole
//! buffer it moves to splice(2) through a pipe, so bulk payload passes
//! between the two sockets as page references and is never copied through
//! user space. This is what lets a two-thread relay beat HAProxy's
//! `splice-auto` in BENCHMARKS.md. Memory per connection is bounded: a
//! buffer of `COPY_BUFFER` and a pipe of `PIPE_SIZE` per direction; and so
//! is a connection's life: one that moves no byte for the idle timeout is
//! closed, and TCP keepalive notices a peer that is gone. A reset on one
//! side is passed on as a reset to the other.
//!
//! A socket in a sockmap (`bypass`) hands its data to recvmsg but not to
//! splice: when a readable socket gives splice nothing while recv(MSG_PEEK)
//! sees data, that direction falls back to copying through a buffer.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use nix::sys::socket::{
    self as nixsock, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage,
};
use tokio::io::Interest;
use tokio::net::{TcpSocket, TcpStream};
use tracing::{debug, warn};

use crate::out;
use crate::runtime::Relay;
use crate::sys::handover::{tcp_listener_role, Bequest, Inheritance};
use crate::sys::sockopt::{original_destination, set_mark};
use crate::telemetry::stats::{Metric, Snapshot};

/// Bytes a pipe (one per direction) may hold; also the largest splice.
const PIPE_SIZE: usize = 256 * 1024;
/// Buffer of a direction while it copies (before splicing, or instead).
const COPY_BUFFER: usize = 32 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive on both sockets: a peer that vanished without a FIN or RST
/// is noticed after `KEEPALIVE_IDLE + KEEPALIVE_COUNT * KEEPALIVE_INTERVAL`.
const KEEPALIVE_IDLE: u32 = 60;
const KEEPALIVE_INTERVAL: u32 = 10;
const KEEPALIVE_COUNT: u32 = 6;
/// How long an abort waits for what was relayed before it to be delivered.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Marks the proxy's upstream sockets so `redirect` never sends them back.
pub const DEFAULT_MARK: u32 = 0x5052;

/// How long a stopping proxy waits for its connections to end.
pub const STOP_GRACE: Duration = Duration::from_secs(1);

/// Options of the relay itself, shared by every subcommand that runs it.
#[derive(Args, Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayArgs {
    /// Close a relayed connection on both sides after this many seconds
    /// without a byte in either direction (0: never)
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    pub idle_timeout: u64,
}

impl RelayArgs {
    pub fn idle_timeout(&self) -> Option<Duration> {
        (self.idle_timeout != 0).then(|| Duration::from_secs(self.idle_timeout))
    }
}

pub fn default_listen_addrs(port: u16) -> Vec<SocketAddr> {
    vec![
        SocketAddr::new(IpAddr::from([127, 0, 0, 1]), port),
        SocketAddr::new(IpAddr::from(std::net::Ipv6Addr::LOCALHOST), port),
    ]
}

/// Where a relayed connection's real destination comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationSource {
    /// `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` (iptables REDIRECT, `redirect`).
    OriginalDstOption,
    /// The accepted socket's own local address (TPROXY, `tproxy`).
    LocalAddress,
}

#[derive(Debug, Clone, Copy)]
pub struct ProxyConfig {
    pub mark: u32,
    pub destination: DestinationSource,
    /// Listen with IP_TRANSPARENT (needed for TPROXY-style delivery).
    pub transparent: bool,
    /// Close connections idle for this long.
    pub idle_timeout: Option<Duration>,
}

impl ProxyConfig {
    /// A proxy behind REDIRECT learns destinations from SO_ORIGINAL_DST; a
    /// transparent one (TPROXY, `tproxy`) from its accepted sockets' own
    /// local address.
    pub fn new(mark: u32, transparent: bool, relay: &RelayArgs) -> ProxyConfig {
        ProxyConfig {
            mark,
            destination: if transparent {
                DestinationSource::LocalAddress
            } else {
                DestinationSource::OriginalDstOption
            },
            transparent,
            idle_timeout: relay.idle_timeout(),
        }
    }
}

/// Counters of a running proxy.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
    pub upstream_failed: AtomicU64,
    pub relayed: AtomicU64,
    pub relay_errors: AtomicU64,
    pub idle_closed: AtomicU64,
    pub bytes_upstream: AtomicU64,
    pub bytes_downstream: AtomicU64,
    pub copy_fallbacks: AtomicU64,
    /// Reset at the end of a hand-over's drain.
    pub cut: AtomicU64,
    /// Connections accepted and not yet ended.
    pub open: AtomicU64,
}

/// Counts a connection as open while it lives.
struct OpenConnection(Arc<Shared>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ProxyStats {
    /// The relay's counters as named data.
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::new("proxy");
        let counters = [
            (
                "accepted",
                "connections accepted",
                "Connections accepted.",
                &self.accepted,
            ),
            (
                "relayed",
                "relayed to the end",
                "Connections relayed until both sides closed.",
                &self.relayed,
            ),
            (
                "refused",
                "refused (no original destination or a loop)",
                "Connections refused: no original destination, or the proxy itself.",
                &self.refused,
            ),
            (
                "upstream_connect_failed",
                "upstream connect failed",
                "Upstream connects that failed.",
                &self.upstream_failed,
            ),
            (
                "aborted",
                "aborted, reset passed on",
                "Relays ended by an error on either side, passed on as resets.",
                &self.relay_errors,
            ),
            (
                "idle_closed",
                "closed when idle",
                "Connections closed after --idle-timeout without traffic.",
                &self.idle_closed,
            ),
            (
                "upstream_bytes",
                "bytes client->upstream",
                "Bytes relayed from clients to upstreams.",
                &self.bytes_upstream,
            ),
            (
                "downstream_bytes",
                "bytes upstream->client",
                "Bytes relayed from upstreams to clients.",
                &self.bytes_downstream,
            ),
            (
                "copy_fallbacks",
                "splice->copy fallbacks",
                "Relays that fell back from splice to copying (sockmap sockets).",
                &self.copy_fallbacks,
            ),
            (
                "cut_after_handover",
                "cut at the end of a hand-over's drain",
                "Connections still open when the drain after a hand-over ended, reset.",
                &self.cut,
            ),
        ];
        snapshot.push_atomic_counters(counters);
        snapshot.push(Metric::gauge(
            "open_connections",
            "open connections",
            "Connections accepted and not yet ended.",
            self.open.load(Ordering::Relaxed),
        ));
        snapshot
    }

    pub fn print(&self) {
        out!("=== Proxy ===");
        self.snapshot().print();
    }
}

/// Listening sockets, bound before anything is attached so that an occupied
/// port fails early and leaves nothing behind.
pub struct BoundProxy {
    listeners: Vec<std::net::TcpListener>,
    config: ProxyConfig,
}

impl BoundProxy {
    /// Listens on `addrs`, taking each socket that a predecessor handed
    /// over (`inheritance`) instead of binding it again: its accept queue
    /// comes with it.
    pub fn bind(
        addrs: &[SocketAddr],
        config: ProxyConfig,
        inheritance: &Inheritance,
    ) -> Result<Self> {
        let listeners = addrs
            .iter()
            .map(
                |addr| match inheritance.take(&tcp_listener_role(*addr, config.transparent)) {
                    Some(fd) => Ok(std::net::TcpListener::from(fd)),
                    None => listen(*addr, config.transparent),
                },
            )
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { listeners, config })
    }

    /// The listening sockets, in the order of the addresses given to bind().
    pub fn listener_fds(&self) -> Vec<RawFd> {
        self.listeners.iter().map(|l| l.as_raw_fd()).collect()
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Starts relaying on `runtime`, which other proxies may share; dropping
    /// the returned handle stops accepting, while relays in progress finish
    /// (or end with the runtime).
    pub fn start_on(self, runtime: Arc<tokio::runtime::Runtime>) -> Result<RunningProxy> {
        let stats = Arc::new(ProxyStats::default());
        let shared = Arc::new(Shared {
            config: self.config,
            listen_addrs: self.local_addrs(),
            stats: stats.clone(),
            cut: tokio::sync::Notify::new(),
        });
        let mut listeners = Vec::new();
        for listener in self.listeners {
            listener.set_nonblocking(true)?;
            let role = tcp_listener_role(listener.local_addr()?, self.config.transparent);
            let _guard = runtime.enter();
            listeners.push((role, Arc::new(tokio::net::TcpListener::from_std(listener)?)));
        }
        let mut proxy = RunningProxy {
            runtime: Some(runtime),
            listeners,
            accept_loops: Vec::new(),
            shared,
            stats,
        };
        proxy.accept();
        Ok(proxy)
    }
}

pub struct RunningProxy {
    runtime: Option<Arc<tokio::runtime::Runtime>>,
    /// Each listening socket with its hand-over role.
    listeners: Vec<(String, Arc<tokio::net::TcpListener>)>,
    accept_loops: Vec<tokio::task::JoinHandle<()>>,
    shared: Arc<Shared>,
    pub stats: Arc<ProxyStats>,
}

impl RunningProxy {
    fn accept(&mut self) {
        let runtime = self.runtime.as_ref().expect("running");
        for (_, listener) in &self.listeners {
            let (listener, shared) = (listener.clone(), self.shared.clone());
            self.accept_loops
                .push(runtime.spawn(accept_loop(listener, shared)));
        }
    }

    fn stop_accepting(&mut self) {
        for accept_loop in self.accept_loops.drain(..) {
            accept_loop.abort();
        }
    }

    /// Stops accepting and gives the connections in progress up to
    /// `grace` to end, so that the final statistics count them.
    pub fn stop(&mut self, grace: Duration) {
        self.stop_accepting();
        let deadline = std::time::Instant::now() + grace;
        while self.stats.open.load(Ordering::Relaxed) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The proxy's runtime, for relays that run beside the TCP one.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        self.runtime.as_ref().expect("running").handle()
    }
}

impl Relay for RunningProxy {
    fn bequeath(&self, bequest: &mut Bequest) -> Result<()> {
        for (role, listener) in &self.listeners {
            bequest.give(role.clone(), serde_json::Value::Null, listener.as_fd())?;
        }
        Ok(())
    }

    /// Connections that arrive meanwhile wait in the accept queues, which
    /// the successor reads from the same sockets.
    fn release(&mut self, _bequest: &mut Bequest) -> Result<()> {
        self.stop_accepting();
        Ok(())
    }

    fn resume(&mut self) -> Result<()> {
        self.stop_accepting();
        self.accept();
        Ok(())
    }

    fn retire(&mut self, taken: &[String]) {
        self.stop_accepting();
        let runtime = self.runtime.clone().expect("running");
        for (role, listener) in self.listeners.drain(..) {
            if taken.contains(&role) {
                continue;
            }
            // A socket the successor did not take (its address changed):
            // what completed its handshake before the programs moved to
            // the successor is served here rather than reset.
            while let Some((client, peer)) = accept_now(&listener, &runtime) {
                spawn_serve(client, peer, self.shared.clone());
            }
        }
    }

    fn open_connections(&self) -> u64 {
        self.stats.open.load(Ordering::Relaxed)
    }

    fn cut(&self) {
        self.shared.cut.notify_waiters();
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        self.stop_accepting();
        // A runtime of its own ends here; a shared one with its last user.
        if let Some(Ok(runtime)) = self.runtime.take().map(Arc::try_unwrap) {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// A connection already in `listener`'s accept queue, without waiting.
fn accept_now(
    listener: &tokio::net::TcpListener,
    runtime: &tokio::runtime::Runtime,
) -> Option<(TcpStream, SocketAddr)> {
    // SAFETY: accept4 on a listening socket the listener owns; null peer.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: accept4 just returned this descriptor; nothing else owns it.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let peer = stream.peer_addr().ok()?;
    let _guard = runtime.enter();
    Some((TcpStream::from_std(stream).ok()?, peer))
}

fn listen(addr: SocketAddr, transparent: bool) -> Result<std::net::TcpListener> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = nixsock::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .with_context(|| format!("creating a socket for {addr}"))?;
    nixsock::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if addr.is_ipv6() {
        nixsock::setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    if transparent {
        nixsock::setsockopt(&fd, sockopt::IpTransparent, &true)
            .context("setting IP_TRANSPARENT on the proxy socket")?;
    }
    nixsock::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(|errno| match errno {
        nix::errno::Errno::EADDRINUSE => {
            anyhow::anyhow!("proxy address {addr} is already in use (another proxy running? pick another with -p)")
        }
        nix::errno::Errno::EADDRNOTAVAIL => {
            anyhow::anyhow!("proxy address {addr} is not an address of this host")
        }
        other => anyhow::anyhow!("binding the proxy to {addr}: {other}"),
    })?;
    nixsock::listen(&fd, nixsock::Backlog::MAXCONN)
        .with_context(|| format!("listening on {addr}"))?;
    Ok(std::net::TcpListener::from(fd))
}

struct Shared {
    config: ProxyConfig,
    listen_addrs: Vec<SocketAddr>,
    stats: Arc<ProxyStats>,
    /// Wakes every relay to reset its connection (a drain's deadline).
    cut: tokio::sync::Notify,
}

async fn accept_loop(listener: Arc<tokio::net::TcpListener>, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => spawn_serve(client, peer, shared.clone()),
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("proxy accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves one accepted connection on its own task, counted while open.
fn spawn_serve(client: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
    shared.stats.open.fetch_add(1, Ordering::Relaxed);
    let open = OpenConnection(shared);
    tokio::spawn(async move {
        serve(client, peer, open.0.clone()).await;
        drop(open);
    });
}

async fn serve(client: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let stats = &shared.stats;
    let Some(destination) = destination_of(&client, &shared) else {
        stats.refused.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let upstream = match connect_upstream(destination, shared.config.mark).await {
        Ok(upstream) => upstream,
        Err(err) => {
            debug!("{peer} -> {destination}: upstream connect failed: {err}");
            stats.upstream_failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    for socket in [&client, &upstream] {
        if let Err(err) = set_keepalive(socket) {
            debug!("{peer} -> {destination}: setting TCP keepalive: {err}");
        }
    }
    let traffic = [
        Traffic::new(&stats.bytes_upstream),
        Traffic::new(&stats.bytes_downstream),
    ];
    tokio::select! {
        result = relay(&client, &upstream, &traffic, stats) => match result {
            Ok(()) => stats.relayed.fetch_add(1, Ordering::Relaxed),
            Err(err) => {
                debug!("{peer} -> {destination}: relay ended: {err}");
                // A reset (or any failure) on one side is passed on as a
                // reset, so that a truncated transfer never looks complete;
                // what was relayed before it is delivered first.
                flush(&[&client, &upstream]).await;
                abort_on_close(&client);
                abort_on_close(&upstream);
                stats.relay_errors.fetch_add(1, Ordering::Relaxed)
            }
        },
        () = idle(&traffic, shared.config.idle_timeout) => {
            debug!("{peer} -> {destination}: closed after the idle timeout");
            stats.idle_closed.fetch_add(1, Ordering::Relaxed)
        }
        () = shared.cut.notified() => {
            // A reset, so that a cut transfer never looks complete.
            abort_on_close(&client);
            abort_on_close(&upstream);
            stats.cut.fetch_add(1, Ordering::Relaxed)
        }
    };
}

/// Bytes of one direction of one connection, added to the proxy's total as
/// well; the idle timer watches the connection's own count.
struct Traffic<'a> {
    total: &'a AtomicU64,
    connection: AtomicU64,
}

impl<'a> Traffic<'a> {
    fn new(total: &'a AtomicU64) -> Self {
        Self {
            total,
            connection: AtomicU64::new(0),
        }
    }

    fn add(&self, bytes: usize) {
        self.total.fetch_add(bytes as u64, Ordering::Relaxed);
        self.connection.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// Returns once no byte has moved in either direction for `timeout` (never
/// without one). It looks every eighth of the timeout, so a connection is
/// closed between 1 and 1.25 timeouts after its last byte.
async fn idle(traffic: &[Traffic<'_>; 2], timeout: Option<Duration>) {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    let moved = || {
        traffic
            .iter()
            .map(|t| t.connection.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let mut seen = moved();
    let mut quiet_since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(timeout / 8).await;
        let now = moved();
        if now != seen {
            seen = now;
            quiet_since = tokio::time::Instant::now();
        } else if quiet_since.elapsed() >= timeout {
            return;
        }
    }
}

fn set_keepalive(socket: &TcpStream) -> nix::Result<()> {
    nixsock::setsockopt(socket, sockopt::KeepAlive, &true)?;
    nixsock::setsockopt(socket, sockopt::TcpKeepIdle, &KEEPALIVE_IDLE)?;
    nixsock::setsockopt(socket, sockopt::TcpKeepInterval, &KEEPALIVE_INTERVAL)?;
    nixsock::setsockopt(socket, sockopt::TcpKeepCount, &KEEPALIVE_COUNT)
}

/// Waits (at most `FLUSH_TIMEOUT`) until the peers of the sockets that are
/// still open have acknowledged everything written to them: a reset throws
/// away whatever is still queued.
async fn flush(sockets: &[&TcpStream]) {
    let deadline = tokio::time::Instant::now() + FLUSH_TIMEOUT;
    while sockets.iter().any(|s| unacknowledged(s) > 0) {
        if tokio::time::Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `TCP_CLOSE` of the kernel's `enum tcp_state` (libc does not have it).
const TCP_CLOSE: u8 = 7;

/// Bytes written to an open socket that its peer has not acknowledged.
fn unacknowledged(socket: &TcpStream) -> usize {
    let fd = socket.as_raw_fd();
    // After a reset the send counters keep their last values: the state
    // tells that nothing will be sent any more.
    let mut info = MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: info is a writable buffer of len bytes.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    // SAFETY: zero-initialised; the kernel wrote at most len bytes.
    if ret != 0 || unsafe { info.assume_init() }.tcpi_state == TCP_CLOSE {
        return 0;
    }
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (the same number as TIOCOUTQ) writes one int.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) } != 0 {
        return 0;
    }
    queued.max(0) as usize
}

/// SO_LINGER with a zero timeout: closing the socket sends a RST.
fn abort_on_close(socket: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = nixsock::setsockopt(socket, sockopt::Linger, &linger);
}

/// The real destination, or `None` (logged) when relaying would make the
/// proxy an open relay or a loop.
fn destination_of(client: &TcpStream, shared: &Shared) -> Option<SocketAddr> {
    let local = client.local_addr().ok()?;
    let peer = client.peer_addr().ok()?;
    let destination = match shared.config.destination {
        DestinationSource::LocalAddress => Some(local),
        DestinationSource::OriginalDstOption => {
            match original_destination(client.as_raw_fd(), local) {
                Ok(found) => found,
                Err(err) if err.raw_os_error() == Some(libc::ENOBUFS) => {
                    warn!(
                        "refused {peer}: no record of its original destination: its network \
                         namespace or user holds its whole share of the host's table of \
                         connections waiting for the proxy (see \
                         redirect_original_destinations_refused_by_namespace)"
                    );
                    return None;
                }
                Err(err) => {
                    warn!("refused {peer}: reading its original destination failed: {err}");
                    return None;
                }
            }
        }
    };
    match destination {
        None => {
            warn!("refused {peer}: no original destination (a direct connection to the proxy)");
            None
        }
        Some(dst) if is_listen_addr(dst, &shared.listen_addrs) => {
            warn!("refused {peer}: its original destination {dst} is the proxy itself");
            None
        }
        // Under TPROXY the destination is always the local address.
        Some(dst)
            if shared.config.destination == DestinationSource::OriginalDstOption
                && is_same_endpoint(dst, local) =>
        {
            warn!("refused {peer}: its original destination {dst} is the proxy itself");
            None
        }
        Some(dst) => Some(dst),
    }
}

/// Relaying to a listening address would make a loop; behind a wildcard
/// listener that is any address of this host on the listening port.
fn is_listen_addr(dst: SocketAddr, listen_addrs: &[SocketAddr]) -> bool {
    listen_addrs.iter().any(|l| {
        l.port() == dst.port()
            && (is_same_endpoint(*l, dst) || (l.ip().is_unspecified() && is_local_ip(dst.ip())))
    })
}

/// Whether `ip` is an address of this host: only those can be bound
/// without IP_TRANSPARENT.
fn is_local_ip(ip: IpAddr) -> bool {
    std::net::TcpListener::bind(SocketAddr::new(ip.to_canonical(), 0)).is_ok()
}

fn is_same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    let canonical = |s: SocketAddr| (s.ip().to_canonical(), s.port());
    canonical(a) == canonical(b)
}

async fn connect_upstream(destination: SocketAddr, mark: u32) -> io::Result<TcpStream> {
    let socket = match destination {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if mark != 0 {
        set_mark(socket.as_raw_fd(), mark)?;
    }
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect(socket, destination))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// `TcpSocket::connect` without its `SO_ERROR` on success: every getsockopt
/// in the proxy's cgroup runs redirect's getsockopt program (it answers
/// `SO_ORIGINAL_DST` there), so getpeername says whether the socket
/// connected, and `SO_ERROR` is asked only when it did not.
async fn connect(socket: TcpSocket, destination: SocketAddr) -> io::Result<TcpStream> {
    let fd = socket.into_raw_fd();
    // SAFETY: into_raw_fd gave up the socket's only owner of `fd`.
    let socket = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    match nixsock::connect(fd, &SockaddrStorage::from(destination)) {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
        Err(err) => return Err(err.into()),
    }
    let stream = TcpStream::from_std(socket)?;
    loop {
        stream.writable().await?;
        // A wakeup while still connecting says WouldBlock, which clears
        // the readiness for the next wait.
        let connected = stream.try_io(Interest::WRITABLE, || match stream.peer_addr() {
            Ok(_) => Ok(()),
            Err(err) if err.raw_os_error() == Some(libc::ENOTCONN) => Err(stream
                .take_error()?
                .unwrap_or(io::ErrorKind::WouldBlock.into())),
            Err(err) => Err(err),
        });
        match connected {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            result => return result.map(|()| stream),
        }
    }
}

/// Relays both directions until both have ended; a half-close is passed on
/// as `shutdown(SHUT_WR)`. An error in either direction ends both (the
/// caller then resets both sockets).
async fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
    traffic: &[Traffic<'_>; 2],
    stats: &ProxyStats,
) -> io::Result<()> {
    tokio::try_join!(
        pump(client, upstream, &traffic[0], stats),
        pump(upstream, client, &traffic[1], stats),
    )?;
    Ok(())
}

async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    counter: &Traffic<'_>,
    stats: &ProxyStats,
) -> io::Result<()> {
    // Short exchanges never pay for pipes: copy until one read fills the
    // whole buffer (a bulk transfer), then splice.
    let mut buffer = vec![0u8; COPY_BUFFER];
    if copy(src, dst, &mut buffer, counter, CopyUntil::FullRead).await? == Copied::FullRead {
        splice_all(src, dst, &mut buffer, counter, stats).await?;
    }
    shutdown_write(dst);
    Ok(())
}

async fn splice_all(
    src: &TcpStream,
    dst: &TcpStream,
    buffer: &mut [u8],
    counter: &Traffic<'_>,
    stats: &ProxyStats,
) -> io::Result<()> {
    let pipe = Pipe::new()?;
    loop {
        let filled = match fill_pipe(src, &pipe).await? {
            Fill::Bytes(n) => n,
            Fill::Eof => return Ok(()),
            Fill::Unspliceable => {
                stats.copy_fallbacks.fetch_add(1, Ordering::Relaxed);
                copy(src, dst, buffer, counter, CopyUntil::Eof).await?;
                return Ok(());
            }
        };
        let mut left = filled;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), left)
            }) {
                Ok(n) => left -= n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return Err(err),
            }
        }
        counter.add(filled);
    }
}

enum Fill {
    Bytes(usize),
    Eof,
    Unspliceable,
}

async fn fill_pipe(src: &TcpStream, pipe: &Pipe) -> io::Result<Fill> {
    let write_end = pipe.write.as_raw_fd();
    loop {
        src.readable().await?;
        match src.try_io(Interest::READABLE, || {
            splice(src.as_raw_fd(), write_end, PIPE_SIZE)
        }) {
            Ok(0) => return eof_or_unspliceable(src.as_raw_fd()),
            Ok(n) => return Ok(Fill::Bytes(n)),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                if !has_data_to_recv(src.as_raw_fd())? {
                    continue;
                }
                // Data may simply have arrived after splice looked: splice
                // once more before deciding that it cannot see the data.
                match splice(src.as_raw_fd(), write_end, PIPE_SIZE) {
                    Ok(0) => return eof_or_unspliceable(src.as_raw_fd()),
                    Ok(n) => return Ok(Fill::Bytes(n)),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                        return Ok(Fill::Unspliceable)
                    }
                    Err(err) => return Err(err),
                }
            }
            Err(err) => return Err(err),
        }
    }
}

/// splice reports the end of the stream once the FIN has arrived, even when
/// messages a sockmap redirected before the FIN still wait to be read.
fn eof_or_unspliceable(fd: RawFd) -> io::Result<Fill> {
    Ok(if has_data_to_recv(fd)? {
        Fill::Unspliceable
    } else {
        Fill::Eof
    })
}

/// Peeks at one byte. A reset that arrived meanwhile is returned as the
/// error: peeking takes it off the socket, and a later read would see a
/// clean end of stream, turning the abort into an orderly close.
fn has_data_to_recv(fd: RawFd) -> io::Result<bool> {
    let mut byte = 0u8;
    // SAFETY: a one-byte buffer that outlives the call.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n >= 0 {
        return Ok(n > 0);
    }
    let err = io::Error::last_os_error();
    if err.kind() == io::ErrorKind::WouldBlock {
        return Ok(false);
    }
    Err(err)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyUntil {
    Eof,
    FullRead,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copied {
    Eof,
    FullRead,
}

/// Plain recv/send through `buffer`: the start of every connection, and the
/// fallback for sockets that splice cannot read.
async fn copy(
    src: &TcpStream,
    dst: &TcpStream,
    buffer: &mut [u8],
    counter: &Traffic<'_>,
    until: CopyUntil,
) -> io::Result<Copied> {
    loop {
        let n = match read_some(src, buffer).await? {
            0 => return Ok(Copied::Eof),
            n => n,
        };
        let mut written = 0;
        while written < n {
            dst.writable().await?;
            match dst.try_write(&buffer[written..n]) {
                Ok(m) => written += m,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return Err(err),
            }
        }
        counter.add(n);
        if until == CopyUntil::FullRead && n == buffer.len() {
            return Ok(Copied::FullRead);
        }
    }
}

/// Reads what `src` holds, waiting for readiness only when the socket itself
/// says it has nothing. tokio's cached readiness cannot be trusted here: the
/// splice that found a sockmap socket unspliceable cleared it while the
/// redirected data was already queued, and a sender gone quiet raises no
/// new edge, so waiting first would wait forever.
async fn read_some(src: &TcpStream, buffer: &mut [u8]) -> io::Result<usize> {
    loop {
        match recv_now(src.as_raw_fd(), buffer) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            done => return done,
        }
        src.readable().await?;
        match src.try_io(Interest::READABLE, || recv_now(src.as_raw_fd(), buffer)) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            done => return done,
        }
    }
}

fn recv_now(fd: RawFd, buffer: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buffer is writable for its length and outlives the call.
    let n = unsafe {
        libc::recv(
            fd,
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn shutdown_write(stream: &TcpStream) {
    // SAFETY: the descriptor is owned by stream, alive for the call.
    unsafe { libc::shutdown(stream.as_raw_fd(), libc::SHUT_WR) };
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: fds has room for the two descriptors pipe2 returns.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 just returned these descriptors; we own them.
        let pipe = unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        // Larger pipes mean fewer splices; the default (64 KiB) still works.
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int) };
        Ok(pipe)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain descriptors, null offsets (both are sockets or pipes).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}
