//! The built-in proxy's UDP relay for `redirect --udp-ports`.
//!
//! The proxy's UDP socket receives every redirected datagram. While it does,
//! a `cgroup/recvmsg` program finds the sending socket in this namespace and
//! leaves the datagram's original destination in a map under (namespace
//! cookie, client address); the relay takes it (lookup and delete) right
//! after `recvfrom`, so nothing stays in the map past its datagram and no
//! other namespace's entry can ever match. Each (client, destination) pair
//! is a flow with one connected, marked upstream socket; replies go back
//! from the proxy's socket, where the client's own recvmsg program shows
//! them as coming from the destination. Flows idle for the timeout close;
//! at most `MAX_FLOWS` are open, so memory is bounded.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapHandle};
use nix::sys::socket::{self as nixsock, sockopt, AddressFamily, SockFlag, SockType};
use tokio::net::UdpSocket;
use tracing::debug;

use crate::bpf::redirect::types::{endpoint, udp_flow_key};
use crate::cli::EventFormat;
use crate::redirect::endpoint_addr;
use crate::sockopt::{netns_cookie, set_mark};
use crate::stats::{Metric, Snapshot};
use crate::{dns, events};

/// Open flows at most; a datagram of a new flow beyond it is dropped.
pub const MAX_FLOWS: usize = 16384;
/// Receive buffer of the proxy's UDP sockets, in bytes.
const PROXY_RCVBUF: usize = 4 << 20;
/// The largest UDP payload.
const DATAGRAM_MAX: usize = 65535;

// SAFETY: generated from include/redirect.h: fixed-width fields, explicit padding.
unsafe impl plain::Plain for udp_flow_key {}

#[derive(Debug, Default)]
pub struct UdpStats {
    pub datagrams_up: AtomicU64,
    pub datagrams_down: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub no_destination: AtomicU64,
    pub dropped: AtomicU64,
    pub flows_opened: AtomicU64,
    pub flows_expired: AtomicU64,
    pub flows_refused: AtomicU64,
    pub flows_open: AtomicU64,
}

impl UdpStats {
    /// The UDP relay's counters, under the `proxy` datapath.
    pub fn snapshot(&self) -> Snapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
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
                "udp_flows_expired",
                "UDP flows expired",
                "UDP flows closed after their idle timeout.",
                &self.flows_expired,
            ),
            (
                "udp_flows_refused",
                "UDP flows refused (limit)",
                "UDP flows refused at the flow limit.",
                &self.flows_refused,
            ),
        ];
        let mut snapshot = Snapshot::new("proxy");
        snapshot.push_counters(
            rows.map(|(name, label, help, counter)| (name, label, help, get(counter))),
        );
        snapshot.push(Metric::gauge(
            "udp_flows",
            "UDP flows open now",
            "UDP flows open now.",
            get(&self.flows_open),
        ));
        snapshot
    }

    pub fn print(&self) {
        println!("=== UDP relay ===");
        self.snapshot().print();
    }
}

#[derive(Debug, Clone, Copy)]
pub struct UdpRelayConfig {
    pub mark: u32,
    pub idle_timeout: Duration,
    pub events: EventFormat,
    /// events::monotonic_ns() at start, the zero of event times.
    pub start_ns: u64,
}

/// The proxy's UDP sockets, bound before anything is attached.
pub struct BoundUdpRelay {
    sockets: Vec<std::net::UdpSocket>,
}

impl BoundUdpRelay {
    pub fn bind(addrs: &[SocketAddr]) -> Result<Self> {
        let sockets = addrs.iter().map(|a| bind(*a)).collect::<Result<_>>()?;
        Ok(Self { sockets })
    }

    /// Relays on `runtime` until it shuts down; `orig_dst` is the
    /// `udp_orig_dst` map of the redirect programs.
    pub fn start(
        self,
        runtime: &tokio::runtime::Handle,
        orig_dst: MapHandle,
        config: UdpRelayConfig,
    ) -> Result<Arc<UdpStats>> {
        let stats = Arc::new(UdpStats::default());
        let shared = Arc::new(Shared {
            config,
            orig_dst,
            listen_addrs: self
                .sockets
                .iter()
                .filter_map(|s| s.local_addr().ok())
                .collect(),
            flows: Mutex::new(HashMap::new()),
            stats: stats.clone(),
            epoch: Instant::now(),
        });
        for socket in self.sockets {
            let cookie = netns_cookie(socket.as_raw_fd())
                .context("reading the UDP relay's network namespace cookie")?;
            socket.set_nonblocking(true)?;
            let _guard = runtime.enter();
            let socket = Arc::new(UdpSocket::from_std(socket)?);
            runtime.spawn(receive_loop(socket, cookie, shared.clone()));
        }
        Ok(stats)
    }
}

fn bind(addr: SocketAddr) -> Result<std::net::UdpSocket> {
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
    Ok(std::net::UdpSocket::from(fd))
}

struct Shared {
    config: UdpRelayConfig,
    orig_dst: MapHandle,
    listen_addrs: Vec<SocketAddr>,
    flows: Mutex<HashMap<(SocketAddr, SocketAddr), Arc<Flow>>>,
    stats: Arc<UdpStats>,
    epoch: Instant,
}

struct Flow {
    upstream: UdpSocket,
    /// Milliseconds since `Shared::epoch` of the last datagram either way.
    last_active_ms: AtomicU64,
}

impl Flow {
    /// How long the flow may stay idle from now; zero when it expired.
    fn idle_left(&self, shared: &Shared, idle: Duration) -> Duration {
        let idle_ms = shared
            .now_ms()
            .saturating_sub(self.last_active_ms.load(Ordering::Relaxed));
        idle.saturating_sub(Duration::from_millis(idle_ms))
    }
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Takes the original destination the recvmsg program left for this
    /// datagram.
    fn original_destination(&self, netns_cookie: u64, client: SocketAddr) -> Option<SocketAddr> {
        let key = udp_flow_key {
            netns_cookie,
            client: endpoint_of(client),
            ..Default::default()
        };
        // SAFETY: udp_flow_key is Plain.
        let key = unsafe { plain::as_bytes(&key) };
        let value = self.orig_dst.lookup_and_delete(key).ok()??;
        let original = plain::from_bytes::<endpoint>(&value).ok()?;
        Some(endpoint_addr(original))
    }

    fn flow(
        self: &Arc<Self>,
        client: SocketAddr,
        destination: SocketAddr,
        proxy: &Arc<UdpSocket>,
    ) -> Option<Arc<Flow>> {
        let mut flows = self.flows.lock().unwrap();
        if let Some(flow) = flows.get(&(client, destination)) {
            // Under the lock: an expiring flow sees this and stays.
            flow.last_active_ms.store(self.now_ms(), Ordering::Relaxed);
            return Some(flow.clone());
        }
        if flows.len() >= MAX_FLOWS {
            self.stats.flows_refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let upstream = match connect_upstream(destination, self.config.mark) {
            Ok(upstream) => upstream,
            Err(err) => {
                debug!("{client} -> {destination}: upstream socket: {err}");
                self.stats.flows_refused.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        let flow = Arc::new(Flow {
            upstream,
            last_active_ms: AtomicU64::new(self.now_ms()),
        });
        flows.insert((client, destination), flow.clone());
        self.stats.flows_opened.fetch_add(1, Ordering::Relaxed);
        self.stats.flows_open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(replies(
            flow.clone(),
            proxy.clone(),
            client,
            destination,
            self.clone(),
        ));
        Some(flow)
    }

    fn dns_event(&self, client: SocketAddr, destination: SocketAddr, query: &[u8]) {
        let format = self.config.events;
        if format == EventFormat::Off {
            return;
        }
        let Some(question) = dns::question(query) else {
            return;
        };
        let seconds = events::monotonic_ns().saturating_sub(self.config.start_ns) as f64 / 1e9;
        let qtype = dns::type_name(question.qtype);
        match format {
            EventFormat::Off => {}
            EventFormat::Text => println!(
                "{seconds:12.3} {:<8} {:<16} {client} -> {destination} {} {qtype}",
                "DNS", "", question.name
            ),
            EventFormat::Json => println!(
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

fn endpoint_of(addr: SocketAddr) -> endpoint {
    let mut ep = endpoint {
        port: addr.port().to_be(),
        ..Default::default()
    };
    match addr.ip() {
        IpAddr::V4(ip) => {
            ep.family = libc::AF_INET as u16;
            ep.ip[0] = u32::from_ne_bytes(ip.octets());
        }
        IpAddr::V6(ip) => {
            ep.family = libc::AF_INET6 as u16;
            let octets = ip.octets();
            for (word, chunk) in ep.ip.iter_mut().zip(octets.chunks(4)) {
                *word = u32::from_ne_bytes(chunk.try_into().unwrap());
            }
        }
    }
    ep
}

fn connect_upstream(destination: SocketAddr, mark: u32) -> io::Result<UdpSocket> {
    let any = match destination {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    };
    let socket = std::net::UdpSocket::bind(any)?;
    set_mark(socket.as_raw_fd(), mark)?;
    socket.connect(destination)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// Sends without waiting. Tokio's try_send refuses to before its reactor
/// has seen the socket writable once, which a new flow's socket has not.
fn send_now(socket: &UdpSocket, datagram: &[u8], to: Option<SocketAddr>) -> io::Result<usize> {
    let flags = nixsock::MsgFlags::MSG_DONTWAIT;
    let fd = socket.as_raw_fd();
    match to {
        Some(to) => nixsock::sendto(fd, datagram, &nixsock::SockaddrStorage::from(to), flags),
        None => nixsock::send(fd, datagram, flags),
    }
    .map_err(io::Error::from)
}

thread_local! {
    static REPLY_BUFFER: RefCell<Vec<u8>> = RefCell::new(vec![0; DATAGRAM_MAX]);
}

async fn receive_loop(proxy: Arc<UdpSocket>, netns_cookie: u64, shared: Arc<Shared>) {
    let stats = &shared.stats;
    let mut buffer = vec![0u8; DATAGRAM_MAX];
    loop {
        let (len, client) = match proxy.recv_from(&mut buffer).await {
            Ok(received) => received,
            Err(err) => {
                debug!("UDP proxy receive: {err}");
                continue;
            }
        };
        let datagram = &buffer[..len];
        let destination = shared
            .original_destination(netns_cookie, client)
            .filter(|d| !shared.listen_addrs.contains(d));
        let Some(destination) = destination else {
            stats.no_destination.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let Some(flow) = shared.flow(client, destination, &proxy) else {
            continue;
        };
        match send_now(&flow.upstream, datagram, None) {
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
            shared.dns_event(client, destination, datagram);
        }
    }
}

/// Relays the replies of one flow until it has been idle for the timeout.
async fn replies(
    flow: Arc<Flow>,
    proxy: Arc<UdpSocket>,
    client: SocketAddr,
    destination: SocketAddr,
    shared: Arc<Shared>,
) {
    let stats = &shared.stats;
    let idle = shared.config.idle_timeout;
    loop {
        let left = flow.idle_left(&shared, idle);
        if left.is_zero() {
            // Removed only if still idle under the lock, so that a datagram
            // just handed to this flow never goes out without its replies.
            let mut flows = shared.flows.lock().unwrap();
            if flow.idle_left(&shared, idle).is_zero() {
                flows.remove(&(client, destination));
                break;
            }
            continue;
        }
        match tokio::time::timeout(left, flow.upstream.readable()).await {
            Err(_) => continue, // re-check: the client may have sent meanwhile
            Ok(Err(err)) => {
                debug!("{client} -> {destination}: {err}");
                shared.flows.lock().unwrap().remove(&(client, destination));
                break;
            }
            Ok(Ok(())) => {}
        }
        // One buffer per worker thread, not per flow: receive and send
        // without yielding in between.
        let relayed = REPLY_BUFFER.with_borrow_mut(|buffer| {
            let len = flow.upstream.try_recv(buffer)?;
            if let Err(err) = send_now(&proxy, &buffer[..len], Some(client)) {
                debug!("{destination} -> {client}: {err}");
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            io::Result::Ok(Some(len))
        });
        match relayed {
            Ok(None) => {}
            Ok(Some(len)) => {
                flow.last_active_ms
                    .store(shared.now_ms(), Ordering::Relaxed);
                stats.datagrams_down.fetch_add(1, Ordering::Relaxed);
                stats.bytes_down.fetch_add(len as u64, Ordering::Relaxed);
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            // ICMP unreachable from the destination: the flow stays, as the
            // client's own socket would.
            Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(err) => {
                debug!("{client} -> {destination}: {err}");
                shared.flows.lock().unwrap().remove(&(client, destination));
                break;
            }
        }
    }
    stats.flows_open.fetch_sub(1, Ordering::Relaxed);
    stats.flows_expired.fetch_add(1, Ordering::Relaxed);
}
