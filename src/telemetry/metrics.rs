//! `--metrics ADDR`: the statistics as Prometheus text on
//! `http://ADDR/metrics`, served by a `PageServer`.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};

use anyhow::{Context, Result};

use crate::sys::handover::{Bequest, Inheritance};
use crate::telemetry::page_server::{Answer, PageServer};
use crate::telemetry::stats::{prometheus_text, Snapshot};

pub struct MetricsServer {
    pages: PageServer,
    addr: SocketAddr,
    /// A duplicate of the listening socket, for a successor to take over.
    listener: OwnedFd,
}

impl MetricsServer {
    /// Binds at once, so that an occupied address fails before anything
    /// is attached; takes the socket a predecessor handed over instead.
    pub fn bind(addr: SocketAddr, inheritance: &Inheritance) -> Result<MetricsServer> {
        let listener = match inheritance.take(&role(addr)) {
            Some(fd) => TcpListener::from(fd),
            None => {
                TcpListener::bind(addr).with_context(|| format!("serving metrics on {addr}"))?
            }
        };
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        Ok(MetricsServer {
            listener: listener.as_fd().try_clone_to_owned()?,
            pages: PageServer::spawn(
                "metrics",
                listener,
                String::new(),
                Answer::ToRequest(respond),
            ),
            addr,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Offers the listening socket to a successor.
    pub fn bequeath(&self, bequest: &mut Bequest) -> Result<()> {
        bequest.give(
            role(self.addr),
            serde_json::Value::Null,
            self.listener.as_fd(),
        )
    }

    /// The page the next scrape gets.
    pub fn publish(&self, text: String) {
        self.pages.publish(text);
    }
}

/// The hand-over role of the metrics socket at `addr`.
fn role(addr: SocketAddr) -> String {
    format!("metrics {addr}")
}

/// The answer to one HTTP request: the page at GET /metrics, else 404.
fn respond(request: &[u8], page: &str) -> Vec<u8> {
    let request = String::from_utf8_lossy(request);
    let mut parts = request.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = if method == "GET" && path == "/metrics" {
        ("200 OK", "text/plain; version=0.0.4; charset=utf-8", page)
    } else {
        (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "only /metrics is served here\n",
        )
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// `--metrics` / `[metrics]`: a server when an address was given.
pub struct Metrics {
    server: Option<MetricsServer>,
    requested: Option<SocketAddr>,
}

impl Metrics {
    pub fn bind(addr: Option<SocketAddr>, inheritance: &Inheritance) -> Result<Metrics> {
        Ok(Metrics {
            server: addr
                .map(|addr| MetricsServer::bind(addr, inheritance))
                .transpose()?,
            requested: addr,
        })
    }

    /// Offers the listening socket, if any, to a successor.
    pub fn bequeath(&self, bequest: &mut Bequest) -> Result<()> {
        match &self.server {
            Some(server) => server.bequeath(bequest),
            None => Ok(()),
        }
    }

    /// Stops serving (a successor serves the same socket).
    pub fn close(&mut self) {
        self.server = None;
    }

    pub fn is_serving(&self) -> bool {
        self.server.is_some()
    }

    /// The address asked for (port 0 stays 0).
    pub fn addr(&self) -> Option<SocketAddr> {
        self.requested
    }

    /// Publishes the snapshots with a build-info gauge labelled with the
    /// version, the kernel and `build_info` (the attach mode).
    pub fn publish(&self, snapshots: &[Snapshot], build_info: &[(&'static str, String)]) {
        let Some(server) = &self.server else { return };
        let mut info = vec![
            ("version", env!("CARGO_PKG_VERSION").to_owned()),
            ("kernel", kernel_release()),
        ];
        info.extend_from_slice(build_info);
        server.publish(prometheus_text(snapshots, &info));
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_owned())
        .unwrap_or_default()
}
