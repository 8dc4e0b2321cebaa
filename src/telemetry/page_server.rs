//! A page served from a thread of its own: the run loop publishes a fresh
//! copy about once a second (BPF maps are read there), and a reader never
//! waits for the datapaths. `/metrics` and the status socket are two.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A listener the serving thread polls without blocking.
pub trait Listener: Send + 'static {
    type Stream;
    fn accept_one(&self) -> std::io::Result<Self::Stream>;
}

impl Listener for std::net::TcpListener {
    type Stream = std::net::TcpStream;
    fn accept_one(&self) -> std::io::Result<Self::Stream> {
        self.accept().map(|(stream, _)| stream)
    }
}

impl Listener for std::os::unix::net::UnixListener {
    type Stream = std::os::unix::net::UnixStream;
    fn accept_one(&self) -> std::io::Result<Self::Stream> {
        self.accept().map(|(stream, _)| stream)
    }
}

pub struct PageServer {
    page: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PageServer {
    /// Serves `page` on `listener` (already non-blocking): each accepted
    /// connection is given to `answer` with the page of the moment. `what`
    /// names the server in log lines.
    pub fn spawn<L: Listener>(
        what: &'static str,
        listener: L,
        page: String,
        answer: impl Fn(L::Stream, &str) -> std::io::Result<()> + Send + 'static,
    ) -> PageServer {
        let page = Arc::new(Mutex::new(page));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (page, stop) = (page.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept_one() {
                        Ok(stream) => {
                            let text = page.lock().unwrap().clone();
                            if let Err(err) = answer(stream, &text) {
                                tracing::debug!("{what} request: {err}");
                            }
                        }
                        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(err) => {
                            tracing::warn!("{what} listener: {err}");
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    }
                }
            })
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
