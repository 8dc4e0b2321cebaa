//! Small real servers for the demo and the tests, each on its own thread
//! inside a network namespace, stopped on drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

use crate::sys::netns::NetNs;

/// A server thread; `peers` lists the client addresses it accepted.
pub struct Server {
    pub addr: SocketAddr,
    pub peers: Peers,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Server {
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

/// Serves HTTP/1.1 in `netns` on `addr`: a POST is answered with its own
/// body; any other request with `peer=<client> local=<server>`.
pub fn http(netns: &NetNs, addr: &str) -> Result<Server> {
    serve(netns, addr, handle_http)
}

/// Echoes every byte back until the client half-closes, then closes.
pub fn echo(netns: &NetNs, addr: &str) -> Result<Server> {
    serve(netns, addr, |mut stream: TcpStream| {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = stream.read(&mut buffer)?;
            if n == 0 {
                return Ok(());
            }
            stream.write_all(&buffer[..n])?;
        }
    })
}

/// Sends every UDP datagram back to where it came from; `peers` lists the
/// senders.
pub fn udp_echo(netns: &NetNs, addr: &str) -> Result<Server> {
    spawn(netns, addr, |addr, ready, stop, peers| {
        let socket =
            UdpSocket::bind(addr).with_context(|| format!("binding a server to {addr}"))?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        ready.send(()).ok();
        let mut buffer = vec![0u8; 65536];
        while !stop.load(Ordering::SeqCst) {
            match socket.recv_from(&mut buffer) {
                Ok((n, peer)) => {
                    peers.lock().unwrap().push(peer);
                    socket.send_to(&buffer[..n], peer)?;
                }
                // A receive timeout lets the loop see `stop`; a signal to
                // the process (with SO_RCVTIMEO set, the kernel does not
                // restart the call) is no reason to stop serving.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    })
}

/// A TCP server: one thread per accepted connection runs `handler`.
fn serve(
    netns: &NetNs,
    addr: &str,
    handler: fn(TcpStream) -> std::io::Result<()>,
) -> Result<Server> {
    spawn(netns, addr, move |addr, ready, stop, peers| {
        let listener =
            TcpListener::bind(addr).with_context(|| format!("binding a server to {addr}"))?;
        // std listens with a backlog of 128: a burst of connects to a slow
        // server (an emulated machine) would see SYNs dropped.
        nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::MAXCONN)?;
        listener.set_nonblocking(true)?;
        ready.send(()).ok();
        while !stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((stream, peer)) => {
                    peers.lock().unwrap().push(peer);
                    stream.set_nonblocking(false)?;
                    std::thread::spawn(move || handler(stream));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    })
}

type Peers = Arc<Mutex<Vec<SocketAddr>>>;

/// Runs `body(addr, ready, stop, peers)` on a thread in `netns`; `body`
/// sends on `ready` once it listens and returns when `stop` is set.
fn spawn(
    netns: &NetNs,
    addr: &str,
    body: impl FnOnce(SocketAddr, mpsc::Sender<()>, &AtomicBool, &Peers) -> Result<()> + Send + 'static,
) -> Result<Server> {
    let addr: SocketAddr = addr
        .parse()
        .with_context(|| format!("'{addr}' is not a socket address"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let peers: Peers = Arc::new(Mutex::new(Vec::new()));
    let (ready_tx, ready_rx) = mpsc::channel();
    let thread = {
        let stop = stop.clone();
        let peers = peers.clone();
        netns.spawn(move || body(addr, ready_tx, &stop, &peers))?
    };
    if ready_rx.recv_timeout(Duration::from_secs(5)).is_err() {
        return match thread.join() {
            Ok(Err(err)) => Err(err),
            _ => Err(anyhow!("the server on {addr} did not start")),
        };
    }
    Ok(Server {
        addr,
        peers,
        stop,
        thread: Some(thread),
    })
}

fn handle_http(mut stream: TcpStream) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let content_length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    if head.starts_with("POST") && head.to_ascii_lowercase().contains("expect: 100-continue") {
        stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let mut body = vec![0u8; content_length];
    stream.read_exact(&mut body)?;
    if !head.starts_with("POST") {
        body = format!(
            "peer={} local={}\n",
            stream.peer_addr()?,
            stream.local_addr()?
        )
        .into_bytes();
    }
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(&body)?;
    stream.flush()
}
