//! Following an interface by name: TC links die with their interface, and a
//! container restart deletes it and creates another of the same name.
//! rtnetlink's link group says when either happens.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result};

use crate::cli::EventFormat;
use crate::out;
use crate::sys::clock;
use crate::sys::links::{Attachments, TcPath};

const RTMGRP_LINK: u32 = 1;
const RTM_DELLINK: u16 = 17;
const NLMSG_HDRLEN: usize = 16;
/// struct ifinfomsg: family, pad, type, index (i32), flags, change.
const IFINFOMSG_LEN: usize = 16;

/// What happened to the watched interface since the last poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Gone,
    /// An interface of the watched name exists again, with this ifindex.
    Appeared(u32),
}

/// Watches one interface name in the calling thread's network namespace.
pub struct InterfaceWatch {
    name: String,
    ifindex: Option<u32>,
    socket: OwnedFd,
}

impl InterfaceWatch {
    /// Starts watching `name`, which has `ifindex` now.
    pub fn new(name: &str, ifindex: u32) -> Result<InterfaceWatch> {
        // SAFETY: plain socket(2); the result is checked before it is owned.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("opening an rtnetlink socket");
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; zero is a valid start.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = RTMGRP_LINK;
        // SAFETY: addr is a valid sockaddr_nl of the length given.
        let bound = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if bound < 0 {
            return Err(std::io::Error::last_os_error())
                .context("subscribing to rtnetlink link events");
        }
        Ok(InterfaceWatch {
            name: name.to_owned(),
            ifindex: Some(ifindex),
            socket,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads the pending link events and returns what they mean for the
    /// watched name: it went away, an interface of that name appeared, or
    /// both (deleted and created again between two polls).
    pub fn poll(&mut self) -> Result<Vec<Change>> {
        let mut buffer = vec![0u8; 64 * 1024];
        let mut any = false;
        let mut deleted = false;
        loop {
            // SAFETY: recv(2) into a buffer of the length given.
            let n = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                )
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    Some(libc::EINTR) => continue,
                    // Events were lost: look the name up afresh.
                    Some(libc::ENOBUFS) => {
                        any = true;
                        continue;
                    }
                    _ => return Err(err).context("reading rtnetlink link events"),
                }
            }
            any = true;
            deleted |= self.deletes_ours(&buffer[..n as usize]);
        }
        if !any {
            return Ok(Vec::new());
        }
        let now = nix::net::if_::if_nametoindex(self.name.as_str()).ok();
        let mut changes = Vec::new();
        if self.ifindex.is_some() && (deleted || now != self.ifindex) {
            changes.push(Change::Gone);
            self.ifindex = None;
        }
        if let (None, Some(index)) = (self.ifindex, now) {
            changes.push(Change::Appeared(index));
            self.ifindex = Some(index);
        }
        Ok(changes)
    }

    /// Whether a datagram of netlink messages deletes the watched ifindex.
    fn deletes_ours(&self, mut data: &[u8]) -> bool {
        let mut deleted = false;
        while data.len() >= NLMSG_HDRLEN {
            let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(data[4..6].try_into().unwrap());
            if len < NLMSG_HDRLEN || len > data.len() {
                break;
            }
            if kind == RTM_DELLINK && len >= NLMSG_HDRLEN + IFINFOMSG_LEN {
                let at = NLMSG_HDRLEN + 4;
                let index = i32::from_ne_bytes(data[at..at + 4].try_into().unwrap());
                deleted |= Some(index as u32) == self.ifindex;
            }
            data = &data[((len + 3) & !3).min(data.len())..];
        }
        deleted
    }
}

/// Applies what `watch` saw to the TC attachments of a subcommand: when the
/// interface goes, the dead attachments are let go; when one of its name
/// appears, `attach` attaches again. Each is reported as a line (a JSON
/// record with `--json`), and a disappearance also as a warning.
pub fn follow(
    watch: &mut InterfaceWatch,
    tc: &mut Option<Attachments>,
    format: EventFormat,
    start_ns: u64,
    mut attach: impl FnMut(u32) -> Result<(Attachments, TcPath)>,
) {
    let changes = match watch.poll() {
        Ok(changes) => changes,
        Err(err) => {
            tracing::warn!("following interface {}: {err:#}", watch.name());
            return;
        }
    };
    let name = watch.name().to_owned();
    for change in changes {
        match change {
            Change::Gone => {
                if let Some(gone) = tc.take() {
                    gone.forget_gone_interface();
                }
                tracing::warn!("interface {name} is gone");
                report(
                    format,
                    start_ns,
                    "interface-gone",
                    &name,
                    None,
                    format!(
                        "Interface {name} is gone; attaching again when one of that name appears"
                    ),
                );
            }
            Change::Appeared(index) => {
                match attach(index) {
                    Ok((attached, path)) => {
                        *tc = Some(attached);
                        report(
                        format,
                        start_ns,
                        "interface-back",
                        &name,
                        Some(index),
                        format!("Interface {name} is back (ifindex {index}); attached again via {path}"),
                    );
                    }
                    Err(err) => tracing::warn!(
                    "interface {name} appeared (ifindex {index}) but could not be attached: {err:#}"
                ),
                }
            }
        }
    }
}

fn report(
    format: EventFormat,
    start_ns: u64,
    event: &str,
    name: &str,
    ifindex: Option<u32>,
    text: String,
) {
    match format {
        EventFormat::Json => {
            let seconds = clock::monotonic_ns().saturating_sub(start_ns) as f64 / 1e9;
            let record = serde_json::json!({
                "time": seconds,
                "event": event,
                "interface": name,
                "ifindex": ifindex,
            });
            out!("{record}");
        }
        EventFormat::Text | EventFormat::Off => out!("{text}"),
    }
}
