//! A page served from a thread of its own: the run loop publishes a fresh
//! copy about once a second (BPF maps are read there), and a reader never
//! waits for the datapaths. `/metrics` and the status socket are two.
//!
//! The thread holds every connection at once, non-blocking, under one
//! poll(2): each has `DEADLINE` for the whole exchange, so a client that
//! trickles its request a byte at a time delays nobody else and is closed
//! at its deadline. At `MAX_CONNECTIONS` the oldest is closed for a new one.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long one connection may take, request and answer together.
pub const DEADLINE: Duration = Duration::from_secs(2);
const MAX_CONNECTIONS: usize = 256;
/// A request longer than this is not one of ours.
const MAX_REQUEST: usize = 8192;
/// How often the thread looks whether it must stop.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// A listener the serving thread polls without blocking.
pub trait Listener: AsRawFd + Send + 'static {
    type Stream: Read + Write + AsRawFd + Send;
    fn accept_one(&self) -> io::Result<Self::Stream>;
    fn set_stream_nonblocking(stream: &Self::Stream) -> io::Result<()>;
}

impl Listener for std::net::TcpListener {
    type Stream = std::net::TcpStream;
    fn accept_one(&self) -> io::Result<Self::Stream> {
        self.accept().map(|(stream, _)| stream)
    }
    fn set_stream_nonblocking(stream: &Self::Stream) -> io::Result<()> {
        stream.set_nonblocking(true)
    }
}

impl Listener for std::os::unix::net::UnixListener {
    type Stream = std::os::unix::net::UnixStream;
    fn accept_one(&self) -> io::Result<Self::Stream> {
        self.accept().map(|(stream, _)| stream)
    }
    fn set_stream_nonblocking(stream: &Self::Stream) -> io::Result<()> {
        stream.set_nonblocking(true)
    }
}

/// How a server answers a connection.
pub enum Answer {
    /// Reads the request up to its empty line, then writes what the
    /// function makes of it and the page.
    ToRequest(fn(request: &[u8], page: &str) -> Vec<u8>),
    /// The page itself as soon as a client connects.
    Page,
}

pub struct PageServer {
    page: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PageServer {
    /// Serves `page` on `listener` (already non-blocking) until dropped.
    /// `what` names the server in log lines.
    pub fn spawn<L: Listener>(
        what: &'static str,
        listener: L,
        page: String,
        answer: Answer,
    ) -> PageServer {
        let page = Arc::new(Mutex::new(page));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (page, stop) = (page.clone(), stop.clone());
            std::thread::spawn(move || serve(what, listener, &page, &answer, &stop))
        };
        PageServer {
            page,
            stop,
            thread: Some(thread),
        }
    }

    /// The page the next reader gets.
    pub fn publish(&self, text: String) {
        *self.page.lock().unwrap() = text;
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Connection<S> {
    stream: S,
    deadline: Instant,
    request: Vec<u8>,
    /// The answer once known, and how much of it was written.
    answer: Option<(Vec<u8>, usize)>,
}

enum Progress {
    Pending,
    Done,
}

impl<S: Read + Write> Connection<S> {
    fn wants_write(&self) -> bool {
        self.answer.is_some()
    }

    /// Reads what is there, then writes what it can.
    fn advance(&mut self, page: &Mutex<String>, answer: &Answer) -> io::Result<Progress> {
        if self.answer.is_none() {
            let Answer::ToRequest(respond) = answer else {
                unreachable!("a page is answered at accept");
            };
            let mut buffer = [0u8; 1024];
            loop {
                match self.stream.read(&mut buffer) {
                    Ok(0) => return Ok(Progress::Done),
                    Ok(n) => self.request.extend_from_slice(&buffer[..n]),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(err) => return Err(err),
                }
                if self.request.len() > MAX_REQUEST {
                    return Err(io::Error::other("request too long"));
                }
            }
            if !ends_headers(&self.request) {
                return Ok(Progress::Pending);
            }
            let text = page.lock().unwrap().clone();
            self.answer = Some((respond(&self.request, &text), 0));
        }
        let (bytes, written) = self.answer.as_mut().expect("set above");
        while *written < bytes.len() {
            match self.stream.write(&bytes[*written..]) {
                Ok(n) => *written += n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(Progress::Pending)
                }
                Err(err) => return Err(err),
            }
        }
        Ok(Progress::Done)
    }
}

fn ends_headers(request: &[u8]) -> bool {
    request.ends_with(b"\r\n\r\n") || request.ends_with(b"\n\n")
}

fn serve<L: Listener>(
    what: &'static str,
    listener: L,
    page: &Mutex<String>,
    answer: &Answer,
    stop: &AtomicBool,
) {
    let mut connections: Vec<Connection<L::Stream>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        connections.retain(|c| c.deadline > now);
        let timeout = connections
            .iter()
            .map(|c| c.deadline - now)
            .fold(STOP_CHECK, Duration::min);
        let mut fds = vec![pollfd(listener.as_raw_fd(), libc::POLLIN)];
        fds.extend(connections.iter().map(|c| {
            let events = if c.wants_write() {
                libc::POLLOUT
            } else {
                libc::POLLIN
            };
            pollfd(c.stream.as_raw_fd(), events)
        }));
        // SAFETY: fds is a valid array of fds.len() pollfd structs.
        let ready = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                timeout.as_millis().max(1) as libc::c_int,
            )
        };
        if ready <= 0 {
            continue;
        }
        // Connections first, by index, before accepting shifts them.
        let mut finished = Vec::new();
        for (i, fd) in fds.iter().enumerate().skip(1) {
            if fd.revents == 0 {
                continue;
            }
            let connection = &mut connections[i - 1];
            match connection.advance(page, answer) {
                Ok(Progress::Pending) => {}
                Ok(Progress::Done) => finished.push(i - 1),
                Err(err) => {
                    tracing::debug!("{what} request: {err}");
                    finished.push(i - 1);
                }
            }
        }
        for i in finished.into_iter().rev() {
            connections.remove(i);
        }
        if fds[0].revents != 0 {
            accept_all(what, &listener, page, answer, &mut connections);
        }
    }
}

fn accept_all<L: Listener>(
    what: &'static str,
    listener: &L,
    page: &Mutex<String>,
    answer: &Answer,
    connections: &mut Vec<Connection<L::Stream>>,
) {
    loop {
        let stream = match listener.accept_one() {
            Ok(stream) => stream,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
            Err(err) => {
                tracing::warn!("{what} listener: {err}");
                return;
            }
        };
        if let Err(err) = L::set_stream_nonblocking(&stream) {
            tracing::debug!("{what} request: {err}");
            continue;
        }
        if connections.len() >= MAX_CONNECTIONS {
            connections.remove(0);
        }
        let mut connection = Connection {
            stream,
            deadline: Instant::now() + DEADLINE,
            request: Vec::new(),
            answer: None,
        };
        if let Answer::Page = answer {
            let text = page.lock().unwrap().clone();
            connection.answer = Some((text.into_bytes(), 0));
            // Most pages fit the socket buffer: written here and done.
            match connection.advance(page, answer) {
                Ok(Progress::Pending) => {}
                Ok(Progress::Done) => continue,
                Err(err) => {
                    tracing::debug!("{what} request: {err}");
                    continue;
                }
            }
        }
        connections.push(connection);
    }
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}
