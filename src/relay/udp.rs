//! The built-in proxy's UDP relay for `redirect --udp-ports`.
//!
//! One thread serves the proxy's UDP socket of each family and every flow,
//! from one epoll set. While it receives from a proxy socket, a
//! `cgroup/recvmsg` program finds the sending socket in this namespace and
//! writes the datagram's original destination into that socket's slot of
//! the `udp_relay_slots` map, which the relay has mapped into its memory:
//! the thread reads (and clears) the slot as `recvfrom` returns, without a
//! system call. Each (client socket, destination) pair is a flow with one
//! connected, marked upstream socket: the slot names the sending socket by
//! its cookie, so a new socket on a port another socket used starts a flow
//! of its own. A reply is sent back from the proxy's socket, where the
//! client's own recvmsg program shows it as coming from the destination;
//! the relay first writes the flow's socket into the slot, and the
//! relay-side sendmsg program refuses the reply when another socket holds
//! the client's port by then. The thread also closes flows idle for the
//! timeout. At most `MAX_FLOWS` are open (fewer where the descriptor limit
//! is low), and one user at most a quarter of them: a new flow beyond that
//! replaces the user's oldest (UDP has no connection to cut; a client that
//! sends again gets a new flow), and one beyond the limit the oldest of the
//! user with most.
//!
//! One thread rather than one per direction, because a relay adds two hops
//! to an exchange and waking a sleeping thread costs more than the system
//! calls of a hop: one `epoll_wait` hands the thread every request and
//! reply that is ready, and while datagrams keep coming it polls instead of
//! sleeping (`BusyPoll`). Per request and reply it makes six system calls:
//! epoll_wait, recvfrom and send up, then epoll_wait, recv and sendto down.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapHandle};
use nix::sys::socket::{self as nixsock, sockopt, AddressFamily, SockFlag, SockType};
use tracing::debug;

use crate::bpf::redirect::types::{udp_relay_slot, udp_relay_slot_index};
use crate::bpf::Endpoint as _;
use crate::cli::EventFormat;
use crate::out;
use crate::relay::dns;
use crate::sys::clock;
use crate::sys::handover::{udp_socket_role, Bequest, Handed, Inheritance};
use crate::sys::sockopt::{netns_cookie, set_mark};
use crate::telemetry::stats::{Metric, Snapshot};

/// Open flows at most, when the process may open that many descriptors.
pub const MAX_FLOWS: usize = 16384;
/// Descriptors kept for everything but flows: the TCP proxy's connections
/// (two sockets and two pipes each), the metrics and status pages.
const DESCRIPTORS_KEPT: usize = 1024;

/// The flow limit and one user's share of it: each flow holds a socket,
/// so fewer flows than the descriptor limit allows, with room kept for the
/// rest of the process (a full table must not starve accept()).
fn flow_limits() -> (usize, usize) {
    let descriptors = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(MAX_FLOWS as u64, |(soft, _)| soft) as usize;
    let max = MAX_FLOWS
        .min(descriptors.saturating_sub(DESCRIPTORS_KEPT))
        .max(64);
    (max, max / 4)
}
/// Receive buffer of the proxy's UDP sockets, in bytes.
const PROXY_RCVBUF: usize = 4 << 20;
/// The largest UDP payload.
const DATAGRAM_MAX: usize = 65535;

#[derive(Debug, Default)]
pub struct UdpStats {
    pub datagrams_up: AtomicU64,
    pub datagrams_down: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub no_destination: AtomicU64,
    pub dropped: AtomicU64,
    pub flows_opened: AtomicU64,
    pub flows_adopted: AtomicU64,
    pub flows_expired: AtomicU64,
    pub flows_refused: AtomicU64,
    pub flows_evicted: AtomicU64,
    pub replies_refused: AtomicU64,
    pub flows_open: AtomicU64,
}

impl UdpStats {
    /// The UDP relay's counters, under the `proxy` datapath.
    pub fn snapshot(&self) -> Snapshot {
        let rows = [
            (
                "udp_upstream_datagrams",
                "datagrams client->upstream",
                "UDP datagrams relayed from clients.",
                &self.datagrams_up,
            ),
            (
                "udp_downstream_datagrams",
                "datagrams upstream->client",
                "UDP datagrams relayed back to clients.",
                &self.datagrams_down,
            ),
            (
                "udp_upstream_bytes",
                "bytes client->upstream",
                "UDP bytes relayed from clients.",
                &self.bytes_up,
            ),
            (
                "udp_downstream_bytes",
                "bytes upstream->client",
                "UDP bytes relayed back to clients.",
                &self.bytes_down,
            ),
            (
                "udp_no_destination",
                "without original destination",
                "UDP datagrams with no original destination, dropped.",
                &self.no_destination,
            ),
            (
                "udp_dropped",
                "dropped (socket full)",
                "UDP datagrams dropped because a socket was full.",
                &self.dropped,
            ),
            (
                "udp_flows_opened",
                "UDP flows opened",
                "UDP flows opened.",
                &self.flows_opened,
            ),
            (
                "udp_flows_adopted",
                "UDP flows taken over from a predecessor",
                "UDP flows a hand-over moved here from the process before, upstream socket and all.",
                &self.flows_adopted,
            ),
            (
                "udp_flows_expired",
                "UDP flows expired",
                "UDP flows closed after their idle timeout.",
                &self.flows_expired,
            ),
            (
                "udp_flows_refused",
                "UDP flows refused (no socket)",
                "UDP flows whose upstream socket could not be made.",
                &self.flows_refused,
            ),
            (
                "udp_flows_evicted",
                "UDP flows evicted (user share, limit)",
                "UDP flows closed to make room at a user's share or at the flow limit.",
                &self.flows_evicted,
            ),
            (
                "udp_replies_refused",
                "UDP replies for closed client sockets",
                "Replies not sent because the client's socket had closed; their flows close.",
                &self.replies_refused,
            ),
        ];
        let mut snapshot = Snapshot::new("proxy");
        snapshot.push_atomic_counters(rows);
        snapshot.push(Metric::gauge(
            "udp_flows",
            "UDP flows open now",
            "UDP flows open now.",
            self.flows_open.load(Ordering::Relaxed),
        ));
        snapshot
    }

    pub fn print(&self) {
        out!("=== UDP relay ===");
        self.snapshot().print();
    }
}

#[derive(Debug, Clone, Copy)]
pub struct UdpRelayConfig {
    pub mark: u32,
    pub idle_timeout: Duration,
    pub events: EventFormat,
    /// clock::monotonic_ns() at start, the zero of event times.
    pub start_ns: u64,
}

/// The proxy's UDP sockets, bound before anything is attached.
pub struct BoundUdpRelay {
    sockets: Vec<UdpSocket>,
}

impl BoundUdpRelay {
    /// Binds `addrs`, taking each socket a predecessor handed over
    /// (`inheritance`) instead: datagrams queued on it come with it.
    pub fn bind(addrs: &[SocketAddr], inheritance: &Inheritance) -> Result<Self> {
        let sockets = addrs
            .iter()
            .map(|addr| match inheritance.take(&udp_socket_role(*addr)) {
                Some(fd) => Ok(UdpSocket::from(fd)),
                None => bind(*addr),
            })
            .collect::<Result<_>>()?;
        Ok(Self { sockets })
    }

    /// Starts the relay's thread; `slots` is the `udp_relay_slots` map of
    /// the redirect programs. The flows a predecessor handed over
    /// (`inheritance`) go on. It stops when the returned relay is dropped.
    pub fn start(
        self,
        slots: &MapHandle,
        config: UdpRelayConfig,
        inheritance: &Inheritance,
    ) -> Result<UdpRelay> {
        let slots = Slots::map(slots)?;
        let epoll = Epoll::new().context("creating the UDP relay's epoll")?;
        // SAFETY: eventfd() returns a new descriptor or -1.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if wake < 0 {
            return Err(io::Error::last_os_error()).context("creating the UDP relay's eventfd");
        }
        // SAFETY: `wake` is a new descriptor that nothing else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(wake) };
        epoll.add(wake.as_raw_fd(), WAKE_TOKEN)?;
        let listen_addrs = self
            .sockets
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect();
        let mut proxies = Vec::new();
        let mut bequeathable = Vec::new();
        for (index, socket) in self.sockets.into_iter().enumerate() {
            let role = udp_socket_role(socket.local_addr()?);
            bequeathable.push((role, socket.as_fd().try_clone_to_owned()?));
            let cookie = netns_cookie(socket.as_raw_fd())
                .context("reading the UDP relay's network namespace cookie")?;
            let slot = match socket.local_addr()? {
                SocketAddr::V4(_) => udp_relay_slot_index::UDP_SLOT_INET,
                SocketAddr::V6(_) => udp_relay_slot_index::UDP_SLOT_INET6,
            };
            socket.set_nonblocking(true)?;
            epoll.add(socket.as_raw_fd(), PROXY_TOKEN + index as u64)?;
            proxies.push(Proxy {
                address: socket.local_addr()?,
                socket,
                slot,
                netns_cookie: cookie,
            });
        }
        let shared = Arc::new(Shared {
            stats: UdpStats::default(),
            wake,
            stop: AtomicBool::new(false),
        });
        let (max_flows, user_share) = flow_limits();
        let mut relay = Relay {
            max_flows,
            user_share,
            config,
            shared: shared.clone(),
            proxies,
            slots,
            listen_addrs,
            epoll,
            flows: Flows::default(),
            epoch: Instant::now(),
        };
        for flow in inheritance.take_all(FLOW_ROLE) {
            relay.adopt(flow);
        }
        let mut running = UdpRelay {
            shared,
            thread: None,
            paused: Some(relay),
            limits: (max_flows, user_share),
            sockets: bequeathable,
        };
        running.run()?;
        Ok(running)
    }
}

/// The hand-over role of each of the relay's flows.
const FLOW_ROLE: &str = "udp-flow";

/// A proxy socket that clients' datagrams are redirected to.
struct Proxy {
    socket: UdpSocket,
    address: SocketAddr,
    /// Its slot in `udp_relay_slots`.
    slot: udp_relay_slot_index,
    netns_cookie: u64,
}

/// The running relay; dropping it stops its thread and closes its sockets.
pub struct UdpRelay {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Relay>>,
    /// The relay while no thread runs it (paused for a hand-over).
    paused: Option<Relay>,
    limits: (usize, usize),
    /// Duplicates of the proxy sockets with their roles, to offer a
    /// successor while the thread serves them.
    sockets: Vec<(String, OwnedFd)>,
}

impl UdpRelay {
    /// Open flows at most, and of one user.
    pub fn flow_limits(&self) -> (usize, usize) {
        self.limits
    }

    pub fn stats(&self) -> &UdpStats {
        &self.shared.stats
    }

    /// Runs the paused relay on a thread of its own.
    fn run(&mut self) -> Result<()> {
        let Some(relay) = self.paused.take() else {
            return Ok(());
        };
        self.shared.stop.store(false, Ordering::SeqCst);
        let mut count = 0u64;
        // SAFETY: an 8-byte read from our own non-blocking eventfd, which
        // a pause left readable.
        unsafe {
            libc::read(
                self.shared.wake.as_raw_fd(),
                (&mut count as *mut u64).cast(),
                8,
            )
        };
        let thread = std::thread::Builder::new()
            .name("udp-relay".into())
            .spawn(move || relay.run())
            .context("starting the UDP relay thread")?;
        self.thread = Some(thread);
        Ok(())
    }

    /// Stops the thread, keeping the relay, its sockets and flows.
    fn pause(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // SAFETY: an 8-byte write to our own eventfd.
        unsafe {
            libc::write(
                self.shared.wake.as_raw_fd(),
                (&1u64 as *const u64).cast(),
                8,
            )
        };
        if let Some(thread) = self.thread.take() {
            self.paused = thread.join().ok();
        }
    }
}

impl crate::runtime::Relay for UdpRelay {
    fn bequeath(&self, bequest: &mut Bequest) -> Result<()> {
        for (role, socket) in &self.sockets {
            bequest.give(role.clone(), serde_json::Value::Null, socket.as_fd())?;
        }
        Ok(())
    }

    /// Two relays must never read one proxy socket: the slot a datagram's
    /// destination is left in is the receiving process's. The thread stops
    /// here and the successor's starts once its programs are attached;
    /// datagrams wait in the sockets meanwhile. Every flow goes with its
    /// upstream socket, replies queued on it included.
    fn release(&mut self, bequest: &mut Bequest) -> Result<()> {
        self.pause();
        let Some(relay) = &self.paused else {
            return Ok(());
        };
        for flow in relay.flows.by_token.values() {
            let detail = serde_json::json!({
                "proxy": relay.proxies[flow.proxy].address.to_string(),
                "client": flow.client.to_string(),
                "socket": flow.socket,
                "uid": flow.uid,
                "destination": flow.destination.to_string(),
            });
            bequest.give(FLOW_ROLE.into(), detail, flow.upstream.as_fd())?;
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<()> {
        self.run()
    }

    fn retire(&mut self, _taken: &[String]) {
        self.pause();
        self.paused = None;
        self.sockets.clear();
    }

    fn open_connections(&self) -> u64 {
        0
    }

    fn cut(&self) {}
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.pause();
    }
}

fn bind(addr: SocketAddr) -> Result<UdpSocket> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = nixsock::socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .with_context(|| format!("creating a UDP socket for {addr}"))?;
    if addr.is_ipv6() {
        nixsock::setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    // Every client's datagrams queue here: a burst of DNS queries must not
    // overflow the default buffer of a few hundred datagrams.
    if nixsock::setsockopt(&fd, sockopt::RcvBufForce, &PROXY_RCVBUF).is_err() {
        let _ = nixsock::setsockopt(&fd, sockopt::RcvBuf, &PROXY_RCVBUF);
    }
    nixsock::bind(fd.as_raw_fd(), &nixsock::SockaddrStorage::from(addr)).map_err(|errno| {
        match errno {
            nix::errno::Errno::EADDRINUSE => anyhow::anyhow!(
                "UDP proxy address {addr} is already in use (pick another port with -p)"
            ),
            other => anyhow::anyhow!("binding the UDP proxy to {addr}: {other}"),
        }
    })?;
    Ok(UdpSocket::from(fd))
}

/// The `udp_relay_slots` map, mapped into this process.
struct Slots {
    base: NonNull<udp_relay_slot>,
    len: usize,
}

// SAFETY: the slots are read and written by the relay's thread only (and by
// the BPF program inside that thread's recvfrom).
unsafe impl Send for Slots {}

impl Slots {
    fn map(map: &MapHandle) -> Result<Self> {
        let count = udp_relay_slot_index::UDP_SLOT_COUNT.0 as usize;
        anyhow::ensure!(
            map.value_size() as usize == std::mem::size_of::<udp_relay_slot>()
                && map.max_entries() as usize == count,
            "udp_relay_slots does not hold {count} slots of {} bytes",
            std::mem::size_of::<udp_relay_slot>()
        );
        // Array values lie back to back from the start of the mapping
        // (48 bytes each: already a multiple of 8).
        let len = count * std::mem::size_of::<udp_relay_slot>();
        // SAFETY: a new shared mapping of the map's memory, unmapped on drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error()).context("mapping udp_relay_slots");
        }
        let base = NonNull::new(base.cast()).context("mmap returned null")?;
        Ok(Self { base, len })
    }

    /// The sender and original destination the relay-side recvmsg program
    /// left in `slot` for the datagram this thread just received from
    /// `client` on that slot's socket, if it found one; clears the slot, so
    /// that a datagram the program did not see never gets an earlier one's.
    fn take(
        &self,
        slot: udp_relay_slot_index,
        netns_cookie: u64,
        client: SocketAddr,
    ) -> Option<Sender> {
        // SAFETY: slot < UDP_SLOT_COUNT, which map() checked; only this
        // thread touches the slot, and the program wrote it before this
        // thread's recvfrom returned.
        let record = unsafe {
            let ptr = self.base.as_ptr().add(slot.0 as usize);
            let record = ptr.read_volatile();
            ptr.write_volatile(udp_relay_slot::default());
            record
        };
        let sender = record.client.addr();
        let same_sender = record.client.family != 0
            && record.netns_cookie == netns_cookie
            && sender.ip() == client.ip()
            && sender.port() == client.port();
        (same_sender && record.original.family != 0).then(|| Sender {
            destination: record.original.addr(),
            socket: record.client_cookie,
            uid: record.uid,
        })
    }

    /// Names the client socket the reply this thread sends next on `slot`'s
    /// socket is for; the relay-side sendmsg program refuses it for any
    /// other.
    fn expect_reply_for(&self, slot: udp_relay_slot_index, socket: u64) {
        // SAFETY: as in take(); the program reads the field during this
        // thread's next sendto.
        unsafe {
            let ptr = self.base.as_ptr().add(slot.0 as usize);
            std::ptr::addr_of_mut!((*ptr).reply_cookie).write_volatile(socket);
        }
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        // SAFETY: the mapping made in map(), used by no thread any more.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// Who sent a datagram, as the recvmsg program saw it.
struct Sender {
    destination: SocketAddr,
    /// The sending socket's cookie.
    socket: u64,
    uid: u32,
}

/// The epoll token of the eventfd that wakes the relay's thread to stop.
const WAKE_TOKEN: u64 = 0;
/// The epoll token of the first proxy socket; flows count up from 1.
const PROXY_TOKEN: u64 = 1 << 63;

struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1() returns a new descriptor or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Watches `fd` for input (level-triggered), reported as `token`.
    fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: `event` is a valid epoll_event for the call.
        let rc =
            unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn remove(&self, fd: RawFd) {
        // SAFETY: a null event is allowed for EPOLL_CTL_DEL.
        unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
    }

    /// Waits up to `timeout` for events; how many were written to `events`.
    fn wait(&self, events: &mut [libc::epoll_event], timeout: Duration) -> io::Result<usize> {
        let timeout_ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `events` has room for `events.len()` entries.
        let ready = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                timeout_ms,
            )
        };
        if ready < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ready as usize)
    }
}

/// What the relay's owner shares with its thread.
struct Shared {
    stats: UdpStats,
    /// Written to wake the thread when it must stop.
    wake: OwnedFd,
    stop: AtomicBool,
}

/// The relay's thread and everything only it uses.
struct Relay {
    /// Open flows at most, and of one user (`flow_limits`).
    max_flows: usize,
    user_share: usize,
    config: UdpRelayConfig,
    shared: Arc<Shared>,
    proxies: Vec<Proxy>,
    slots: Slots,
    listen_addrs: Vec<SocketAddr>,
    /// The proxy sockets, every flow's upstream socket, and `wake`.
    epoll: Epoll,
    flows: Flows,
    epoch: Instant,
}

#[derive(Default)]
struct Flows {
    /// Flows by their epoll token.
    by_token: HashMap<u64, Flow>,
    /// The same flows' tokens by (client socket cookie, destination).
    by_pair: HashMap<(u64, SocketAddr), u64>,
    /// Each user's flow tokens, oldest first; tokens of closed flows stay
    /// until they reach the front or the list is compacted.
    by_user: HashMap<u32, UserFlows>,
    last_token: u64,
}

#[derive(Default)]
struct UserFlows {
    open: usize,
    tokens: std::collections::VecDeque<u64>,
}

struct Flow {
    upstream: UdpSocket,
    /// The index in `Relay::proxies` of the socket the client sends to,
    /// which sends it the replies.
    proxy: usize,
    client: SocketAddr,
    /// The client socket's cookie: replies go to that socket only.
    socket: u64,
    uid: u32,
    destination: SocketAddr,
    /// Milliseconds since `Relay::epoch` of the last datagram either way.
    last_active_ms: u64,
}

impl Relay {
    /// Milliseconds since `epoch` at `now`.
    fn ms_at(&self, now: Instant) -> u64 {
        now.duration_since(self.epoch).as_millis() as u64
    }

    /// Relays requests and replies, and closes idle flows, until the relay
    /// stops; returns itself, flows and all.
    fn run(mut self) -> Relay {
        let sweep_every =
            (self.config.idle_timeout / 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut next_sweep = Instant::now() + sweep_every;
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
        let mut buffer = vec![0u8; DATAGRAM_MAX];
        let mut busy_poll = BusyPoll::new();
        while !self.shared.stop.load(Ordering::Relaxed) {
            let before = Instant::now();
            let timeout = busy_poll.timeout(before, next_sweep.saturating_duration_since(before));
            let ready = match self.epoll.wait(&mut events, timeout) {
                Ok(ready) => ready,
                Err(err) => {
                    if err.kind() != io::ErrorKind::Interrupted {
                        debug!("UDP relay epoll_wait: {err}");
                    }
                    0
                }
            };
            // One clock reading after the wait serves the whole round.
            let now = Instant::now();
            busy_poll.waited(now, ready > 0);
            if ready == 0 && timeout.is_zero() {
                // Polling found nothing: let a thread that waits for this
                // CPU (the client or the server of the exchange, often) run
                // first.
                std::thread::yield_now();
            }
            let now_ms = self.ms_at(now);
            // Level-triggered: one datagram per ready socket and round, so
            // that no socket waits behind a busy one and no call is spent
            // on an empty queue.
            for event in &events[..ready] {
                // epoll_event is packed on x86-64: copy the token out.
                let token = event.u64;
                match token {
                    WAKE_TOKEN => {}
                    token if token >= PROXY_TOKEN => {
                        self.relay_request((token - PROXY_TOKEN) as usize, &mut buffer, now_ms)
                    }
                    token => self.relay_reply(token, &mut buffer, now_ms),
                }
            }
            if now >= next_sweep {
                self.expire(now_ms);
                next_sweep = now + sweep_every;
            }
        }
        self
    }

    /// Sends one datagram waiting on proxy socket `index` to its original
    /// destination.
    fn relay_request(&mut self, index: usize, buffer: &mut [u8], now_ms: u64) {
        let Some(proxy) = self.proxies.get(index) else {
            return;
        };
        let (len, client) = match proxy.socket.recv_from(buffer) {
            Ok(received) => received,
            Err(err) => {
                if err.kind() != io::ErrorKind::WouldBlock {
                    debug!("UDP proxy receive: {err}");
                }
                return;
            }
        };
        let datagram = &buffer[..len];
        let sender = self
            .slots
            .take(proxy.slot, proxy.netns_cookie, client)
            .filter(|sender| !self.listen_addrs.contains(&sender.destination));
        let Some(sender) = sender else {
            self.shared
                .stats
                .no_destination
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        let destination = sender.destination;
        let Some(flow) = self.flow(client, &sender, index, now_ms) else {
            return;
        };
        let sent = flow.upstream.send(datagram);
        let stats = &self.shared.stats;
        match sent {
            Ok(_) => {
                stats.datagrams_up.fetch_add(1, Ordering::Relaxed);
                stats.bytes_up.fetch_add(len as u64, Ordering::Relaxed);
            }
            Err(err) => {
                debug!("{client} -> {destination}: {err}");
                stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        if destination.port() == 53 {
            self.dns_event(client, destination, datagram);
        }
    }

    /// Sends one reply waiting on the upstream socket of flow `token` to
    /// its client.
    fn relay_reply(&mut self, token: u64, buffer: &mut [u8], now_ms: u64) {
        let Some(flow) = self.flows.by_token.get_mut(&token) else {
            return;
        };
        let stats = &self.shared.stats;
        let (client, destination) = (flow.client, flow.destination);
        match flow.upstream.recv(buffer) {
            Ok(len) => {
                let proxy = &self.proxies[flow.proxy];
                self.slots.expect_reply_for(proxy.slot, flow.socket);
                match proxy.socket.send_to(&buffer[..len], client) {
                    Ok(_) => {
                        flow.last_active_ms = now_ms;
                        stats.datagrams_down.fetch_add(1, Ordering::Relaxed);
                        stats.bytes_down.fetch_add(len as u64, Ordering::Relaxed);
                    }
                    // The client's socket is gone: whoever holds its port
                    // now gets nothing of this flow.
                    Err(err) if err.kind() == io::ErrorKind::PermissionDenied => {
                        stats.replies_refused.fetch_add(1, Ordering::Relaxed);
                        self.close(token);
                    }
                    Err(err) => {
                        debug!("{destination} -> {client}: {err}");
                        stats.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            // ICMP unreachable from the destination: the flow stays, as the
            // client's own socket would.
            Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(err) => {
                debug!("{client} -> {destination}: {err}");
                self.close(token);
            }
        }
    }

    /// The flow of (the sending socket, destination), opened if new,
    /// marked active at `now_ms`.
    fn flow(
        &mut self,
        client: SocketAddr,
        sender: &Sender,
        proxy: usize,
        now_ms: u64,
    ) -> Option<&Flow> {
        let token = match self.flows.by_pair.get(&(sender.socket, sender.destination)) {
            Some(&token) => token,
            None => self.open(client, sender, proxy)?,
        };
        let flow = self.flows.by_token.get_mut(&token)?;
        flow.last_active_ms = now_ms;
        Some(flow)
    }

    /// Opens the flow of (the sending socket, destination) with an
    /// upstream socket of its own, making room within the user's share and
    /// the flow limit first, and returns its token; None when the socket
    /// cannot be made.
    fn open(&mut self, client: SocketAddr, sender: &Sender, proxy: usize) -> Option<u64> {
        let destination = sender.destination;
        let user_open = self.flows.by_user.get(&sender.uid).map_or(0, |u| u.open);
        if user_open >= self.user_share {
            self.evict_oldest_of(sender.uid);
        } else if self.flows.by_pair.len() >= self.max_flows {
            let busiest = self
                .flows
                .by_user
                .iter()
                .max_by_key(|(_, user)| user.open)
                .map(|(&uid, _)| uid);
            if let Some(uid) = busiest {
                self.evict_oldest_of(uid);
            }
        }
        let upstream = match connect_upstream(destination, self.config.mark) {
            Ok(upstream) => upstream,
            Err(err) => {
                debug!("{client} -> {destination}: upstream socket: {err}");
                let stats = &self.shared.stats;
                stats.flows_refused.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        let flow = Flow {
            upstream,
            proxy,
            client,
            socket: sender.socket,
            uid: sender.uid,
            destination,
            last_active_ms: 0,
        };
        let token = self.insert(flow)?;
        self.shared
            .stats
            .flows_opened
            .fetch_add(1, Ordering::Relaxed);
        Some(token)
    }

    /// Adds `flow` to the epoll set and the tables; None (the flow closed)
    /// when epoll refuses it.
    fn insert(&mut self, flow: Flow) -> Option<u64> {
        let flows = &mut self.flows;
        flows.last_token += 1;
        let token = flows.last_token;
        if let Err(err) = self.epoll.add(flow.upstream.as_raw_fd(), token) {
            debug!("{} -> {}: epoll: {err}", flow.client, flow.destination);
            self.shared
                .stats
                .flows_refused
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let (uid, key) = (flow.uid, (flow.socket, flow.destination));
        flows.by_pair.insert(key, token);
        flows.by_token.insert(token, flow);
        let user = flows.by_user.entry(uid).or_default();
        user.open += 1;
        user.tokens.push_back(token);
        if user.tokens.len() > 2 * user.open + 64 {
            let by_token = &flows.by_token;
            user.tokens.retain(|token| by_token.contains_key(token));
        }
        self.shared.stats.flows_open.fetch_add(1, Ordering::Relaxed);
        Some(token)
    }

    /// Takes over a flow a predecessor relayed, upstream socket and all,
    /// when this relay has its proxy socket.
    fn adopt(&mut self, handed: Handed) {
        let detail = &handed.detail;
        let address = |key: &str| detail[key].as_str().and_then(|text| text.parse().ok());
        let proxy_address: Option<SocketAddr> = address("proxy");
        let proxy = self
            .proxies
            .iter()
            .position(|p| Some(p.address) == proxy_address);
        let (Some(proxy), Some(client), Some(destination), Some(socket), Some(uid)) = (
            proxy,
            address("client"),
            address("destination"),
            detail["socket"].as_u64(),
            detail["uid"].as_u64(),
        ) else {
            debug!("a handed-over UDP flow this relay cannot take: {detail}");
            return;
        };
        let flow = Flow {
            upstream: UdpSocket::from(handed.fd),
            proxy,
            client,
            socket,
            uid: uid as u32,
            destination,
            last_active_ms: 0,
        };
        if self.insert(flow).is_some() {
            self.shared
                .stats
                .flows_adopted
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Closes the oldest open flow of `uid`, to make room.
    fn evict_oldest_of(&mut self, uid: u32) {
        while let Some(token) = self
            .flows
            .by_user
            .get_mut(&uid)
            .and_then(|user| user.tokens.pop_front())
        {
            if self.flows.by_token.contains_key(&token) {
                self.close(token);
                self.shared
                    .stats
                    .flows_evicted
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }

    fn close(&mut self, token: u64) {
        let Some(flow) = self.flows.by_token.remove(&token) else {
            return;
        };
        self.flows.by_pair.remove(&(flow.socket, flow.destination));
        if let Some(user) = self.flows.by_user.get_mut(&flow.uid) {
            user.open -= 1;
            if user.open == 0 {
                self.flows.by_user.remove(&flow.uid);
            }
        }
        self.epoll.remove(flow.upstream.as_raw_fd());
        self.shared.stats.flows_open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Closes the flows idle for the timeout.
    fn expire(&mut self, now_ms: u64) {
        let idle_ms = self.config.idle_timeout.as_millis() as u64;
        let idle: Vec<u64> = self
            .flows
            .by_token
            .iter()
            .filter(|(_, flow)| now_ms.saturating_sub(flow.last_active_ms) >= idle_ms)
            .map(|(&token, _)| token)
            .collect();
        for token in idle {
            self.close(token);
            self.shared
                .stats
                .flows_expired
                .fetch_add(1, Ordering::Relaxed);
        }
    }
    fn dns_event(&self, client: SocketAddr, destination: SocketAddr, query: &[u8]) {
        let format = self.config.events;
        if format == EventFormat::Off {
            return;
        }
        let Some(question) = dns::question(query) else {
            return;
        };
        let seconds = clock::monotonic_ns().saturating_sub(self.config.start_ns) as f64 / 1e9;
        let qtype = dns::type_name(question.qtype);
        match format {
            EventFormat::Off => {}
            EventFormat::Text => out!(
                "{seconds:12.3} {:<8} {:<16} {client} -> {destination} {} {qtype}",
                "DNS",
                "",
                question.name
            ),
            EventFormat::Json => out!(
                "{}",
                serde_json::json!({
                    "time": seconds,
                    "action": "dns",
                    "protocol": "udp",
                    "client": client.to_string(),
                    "original": destination.to_string(),
                    "name": question.name,
                    "type": qtype,
                })
            ),
        }
    }
}

fn connect_upstream(destination: SocketAddr, mark: u32) -> io::Result<UdpSocket> {
    let any = match destination {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    };
    let socket = UdpSocket::bind(any)?;
    set_mark(socket.as_raw_fd(), mark)?;
    socket.connect(destination)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// How long the relay polls for the next datagram before it sleeps, while
/// datagrams come faster than that.
const POLL_WINDOW: Duration = Duration::from_micros(30);

/// Adaptive busy polling. A relay adds two hops to each exchange, and
/// waking a sleeping thread costs several microseconds on a virtual
/// machine, more than the system calls of a hop. Once two sleeps in a row
/// ended within `POLL_WINDOW`, the relay polls instead of sleeping, for as
/// long as datagrams keep following each other within the window; a
/// window that passes empty puts it back to sleeping. A lone client's
/// request and its reply (one short sleep, then a long one) never make it
/// poll, so a moderate rate costs no CPU in polling.
struct BusyPoll {
    /// Sleeps in a row that ended within the window.
    short_sleeps: u32,
    last_datagram: Instant,
    /// When the current sleep began; None while polling.
    sleeping_since: Option<Instant>,
}

/// Short sleeps in a row after which the relay polls.
const SHORT_SLEEPS_TO_POLL: u32 = 2;

impl BusyPoll {
    fn new() -> Self {
        Self {
            short_sleeps: 0,
            last_datagram: Instant::now(),
            sleeping_since: None,
        }
    }

    /// The timeout of the next wait at `now`, `idle` when the relay may
    /// sleep.
    fn timeout(&mut self, now: Instant, idle: Duration) -> Duration {
        if self.short_sleeps >= SHORT_SLEEPS_TO_POLL {
            if now.duration_since(self.last_datagram) < POLL_WINDOW {
                self.sleeping_since = None;
                return Duration::ZERO;
            }
            self.short_sleeps = 0;
        }
        self.sleeping_since = Some(now);
        idle
    }

    /// After a wait that ended at `now`; `ready`: it returned work.
    fn waited(&mut self, now: Instant, ready: bool) {
        if !ready {
            return;
        }
        self.last_datagram = now;
        if let Some(since) = self.sleeping_since {
            self.short_sleeps = if now.duration_since(since) < POLL_WINDOW {
                self.short_sleeps + 1
            } else {
                0
            };
        }
    }
}
