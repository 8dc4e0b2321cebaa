//! A connection-rate load for the benchmarks: a testbed tuned for many
//! short connections, a request/reply server that closes first, and a
//! client that runs in its own process (so it starts inside a namespace).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proxy_redirect::sys::netns::{self, NetNs};

use crate::common::{run, Testbed};

/// Request and reply size of the connection-rate load.
pub const MESSAGE: usize = 64;

/// A testbed whose namespaces reuse ports quickly.
pub fn tuned_testbed() -> Testbed {
    let testbed = Testbed::new();
    tune(&testbed.client);
    tune(&testbed.server);
    testbed
}

/// Lets a namespace that opens many short connections reuse ports quickly.
pub fn tune(ns: &NetNs) {
    for setting in [
        "net.ipv4.tcp_tw_reuse=1",
        "net.ipv4.ip_local_port_range=1024 65000",
    ] {
        let mut command = netns::command_in("sysctl", Some(ns), None).unwrap();
        command.args(["-qw", setting]);
        assert!(run(command).status.success(), "sysctl {setting}");
    }
}

/// A server in `ns` on `addr` that reads a MESSAGE-byte request, answers it
/// and closes first (TIME_WAIT stays on the server side). Stops when the
/// returned flag is set.
pub fn start_rr_server(ns: &NetNs, addr: SocketAddr) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let flag = stop.clone();
    ns.spawn(move || {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        ready_tx.send(()).ok();
        let mut buffer = [0u8; MESSAGE];
        while !flag.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    stream.set_nonblocking(false)?;
                    if stream.read_exact(&mut buffer).is_ok() {
                        let _ = stream.write_all(&buffer);
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_micros(200)),
            }
        }
        Ok(())
    })
    .unwrap();
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("request/reply server");
    stop
}

/// The argument that turns a bench binary into the load's client.
pub const RR_CLIENT: &str = "rr-client";
/// The same for the UDP request/response client.
pub const UDP_RR_CLIENT: &str = "udp-rr-client";

/// When this process was started as a client (`RR_CLIENT ADDR SECONDS` or
/// `UDP_RR_CLIENT ADDR SECONDS`), runs it and returns true.
/// What the connection-rate benchmarks take from the environment: full
/// runs, or short ones with BENCH_QUICK. Not every benchmark reads each.
#[allow(dead_code)]
pub struct Settings {
    pub rounds: usize,
    pub cps_seconds: f64,
    pub bulk_seconds: u32,
    /// BPF_PROG_TEST_RUN repeats per measurement.
    pub repeat: u32,
}

/// `None` when this process is a client of another run (it has done its
/// work) or may not run; else the settings of a full or a quick run.
pub fn start() -> Option<Settings> {
    if run_client_if_asked() {
        return None;
    }
    let quick = crate::report::start()?;
    Some(Settings {
        rounds: if quick { 1 } else { 5 },
        cps_seconds: if quick { 0.5 } else { 2.0 },
        bulk_seconds: if quick { 1 } else { 3 },
        repeat: if quick { 100_000 } else { 2_000_000 },
    })
}

fn run_client_if_asked() -> bool {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == RR_CLIENT) {
        rr_client_main(&args[i + 1..]);
        return true;
    }
    if let Some(i) = args.iter().position(|a| a == UDP_RR_CLIENT) {
        udp_rr_client_main(&args[i + 1..]);
        return true;
    }
    false
}

/// The UDP client: two threads, each sending a MESSAGE-byte datagram with
/// sendto() on an unconnected socket (as a DNS stub does) and waiting for
/// the reply with recvfrom(); a datagram lost is sent again after 200 ms.
/// With a RATE, one thread instead, sending RATE requests a second. Then
/// getpeername() on a connected socket, `GETPEERNAME_CALLS` times, so that
/// the getpeername programs' run time can be read. Prints
/// "EXCHANGES SECONDS".
pub fn udp_rr_client_main(args: &[String]) {
    let addr: SocketAddr = args[0].parse().unwrap();
    let seconds: f64 = args[1].parse().unwrap();
    let pace = args
        .get(2)
        .map(|rate| Duration::from_secs_f64(1.0 / rate.parse::<f64>().unwrap()));
    let exchange = move |deadline: Instant, done: &AtomicU64| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let request = [7u8; MESSAGE];
        let mut reply = [0u8; 2048];
        let mut next = Instant::now();
        while Instant::now() < deadline {
            if let Some(pace) = pace {
                next += pace;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            socket.send_to(&request, addr).unwrap();
            if let Ok((MESSAGE, _)) = socket.recv_from(&mut reply) {
                done.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    let threads = if pace.is_some() { 1 } else { 2 };
    let (exchanges, elapsed) = on_threads(threads, seconds, exchange);
    let connected = UdpSocket::bind("0.0.0.0:0").unwrap();
    connected.connect(addr).unwrap();
    for _ in 0..GETPEERNAME_CALLS {
        connected.peer_addr().unwrap();
    }
    println!("{exchanges} {elapsed}");
}

/// Runs `work(deadline, counter)` on `threads` threads until `seconds`
/// have passed; returns what they counted and the seconds it took.
fn on_threads(
    threads: usize,
    seconds: f64,
    work: impl Fn(Instant, &AtomicU64) + Send + Sync + Clone + 'static,
) -> (u64, f64) {
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let threads: Vec<_> = (0..threads)
        .map(|_| {
            let (done, work) = (done.clone(), work.clone());
            std::thread::spawn(move || work(deadline, &done))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    (done.load(Ordering::Relaxed), start.elapsed().as_secs_f64())
}

/// getpeername() calls the UDP client makes after its timed run.
pub const GETPEERNAME_CALLS: usize = 20000;

/// The client half of the load, run in its own process (`args` = ADDR
/// SECONDS) so that it starts inside a namespace or cgroup; prints
/// "CONNECTIONS SECONDS".
pub fn rr_client_main(args: &[String]) {
    let addr: SocketAddr = args[0].parse().unwrap();
    let seconds: f64 = args[1].parse().unwrap();
    let (connections, elapsed) = on_threads(2, seconds, move |deadline, done| {
        let request = [7u8; MESSAGE];
        let mut reply = [0u8; MESSAGE];
        while Instant::now() < deadline {
            let mut stream = TcpStream::connect(addr).expect("connect");
            stream.write_all(&request).unwrap();
            stream.read_exact(&mut reply).unwrap();
            done.fetch_add(1, Ordering::Relaxed);
        }
    });
    println!("{connections} {elapsed}");
}

/// Runs `command` (this bench binary's client mode, already placed in its
/// namespace) against `addr` for `seconds`; connections per second.
pub fn measure_rr(command: Command, addr: SocketAddr, seconds: f64) -> f64 {
    measure_rr_paced(command, addr, seconds, None)
}

/// The same, with the UDP client sending `rate` requests a second.
pub fn measure_rr_paced(
    mut command: Command,
    addr: SocketAddr,
    seconds: f64,
    rate: Option<u32>,
) -> f64 {
    command.args([addr.to_string(), seconds.to_string()]);
    command.args(rate.map(|r| r.to_string()));
    let out = run(command);
    assert!(
        out.status.success(),
        "client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.split_whitespace().map(|f| f.parse::<f64>().unwrap());
    let (count, elapsed) = (fields.next().unwrap(), fields.next().unwrap());
    count / elapsed
}
