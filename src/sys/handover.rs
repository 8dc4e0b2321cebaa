//! Messages with descriptors attached (SCM_RIGHTS) over a unix
//! SOCK_SEQPACKET socket: the channel on which a service hands its
//! listening sockets and UDP flows to its successor. SEQPACKET keeps each
//! message whole, so a JSON text and the descriptors it names arrive
//! together or not at all.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr,
};

/// The most descriptors the kernel passes in one message (SCM_MAX_FD).
pub const MAX_FDS: usize = 253;
/// The largest message text; a successor's offer of 253 UDP flows is
/// about 40 KiB.
const MAX_TEXT: usize = 1 << 20;

/// One connected end.
pub struct Channel {
    fd: OwnedFd,
}

impl Channel {
    /// Connects to the listener at `path`; None when nobody listens there.
    pub fn connect(path: &Path) -> Result<Option<Channel>> {
        let fd = seqpacket()?;
        let addr = UnixAddr::new(path)?;
        socket::setsockopt(&fd, socket::sockopt::SndBuf, &(2 * MAX_TEXT))?;
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => Ok(Some(Channel { fd })),
            Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ECONNREFUSED) => Ok(None),
            Err(err) => Err(err).with_context(|| format!("connecting to {}", path.display())),
        }
    }

    /// Sends `text` with `fds` (at most MAX_FDS) attached.
    pub fn send(&self, text: &str, fds: &[BorrowedFd<'_>]) -> Result<()> {
        anyhow::ensure!(
            fds.len() <= MAX_FDS,
            "{} descriptors in one message",
            fds.len()
        );
        anyhow::ensure!(text.len() <= MAX_TEXT, "a message of {} bytes", text.len());
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
        let iov = [IoSlice::new(text.as_bytes())];
        socket::sendmsg::<()>(
            self.fd.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .context("sending to the other process")?;
        Ok(())
    }

    /// The next message and its descriptors, waiting up to `timeout`.
    /// Err when the other end closed or the time is up.
    pub fn recv(&self, timeout: Duration) -> Result<(String, Vec<OwnedFd>)> {
        if !self.wait_readable(timeout)? {
            bail!("no answer within {} s", timeout.as_secs_f64());
        }
        let mut text = vec![0u8; MAX_TEXT];
        let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [IoSliceMut::new(&mut text)];
        let msg = socket::recvmsg::<()>(
            self.fd.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .context("receiving from the other process")?;
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                // SAFETY: the kernel just installed these descriptors in
                // this process; nothing else owns them.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if msg
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
        {
            bail!("a message from the other process was cut short");
        }
        let len = msg.bytes;
        if len == 0 {
            bail!("the other process closed the channel");
        }
        text.truncate(len);
        let text = String::from_utf8(text).context("a message that is not text")?;
        Ok((text, fds))
    }

    /// Whether a message (or the end) is waiting, after up to `timeout`.
    pub fn wait_readable(&self, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut poll = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd that lives across the call.
            let ready =
                unsafe { libc::poll(&mut poll, 1, left.as_millis().min(i32::MAX as u128) as i32) };
            if ready >= 0 {
                return Ok(ready > 0);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted || left.is_zero() {
                return Err(err).context("waiting for the other process");
            }
        }
    }
}

/// A listening socket at a path that only root can open.
pub struct Listener {
    fd: OwnedFd,
    path: PathBuf,
    inode: Option<u64>,
}

impl Listener {
    /// Listens at `path`, replacing what a killed process left there.
    pub fn bind(path: &Path) -> Result<Listener> {
        let fd = seqpacket()?;
        // accept() is called from the run loop, which must never block.
        nix::fcntl::fcntl(
            fd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        let _ = std::fs::remove_file(path);
        socket::bind(fd.as_raw_fd(), &UnixAddr::new(path)?)
            .with_context(|| format!("creating {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        socket::listen(&fd, socket::Backlog::new(4)?)?;
        socket::setsockopt(&fd, socket::sockopt::SndBuf, &(2 * MAX_TEXT))?;
        Ok(Listener {
            fd,
            path: path.to_path_buf(),
            inode: inode_of(path),
        })
    }

    /// A connection waiting to be accepted, without blocking.
    pub fn accept(&self) -> Result<Option<Channel>> {
        // SAFETY: accept4 on a descriptor we own; null peer address.
        let fd = unsafe {
            libc::accept4(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            )
        };
        if fd < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(err).context("accepting a hand-over connection"),
            };
        }
        // SAFETY: accept4 just returned this descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Messages are read with poll() first; blocking reads are simpler.
        set_blocking(&fd)?;
        socket::setsockopt(&fd, socket::sockopt::SndBuf, &(2 * MAX_TEXT))?;
        Ok(Some(Channel { fd }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the socket to `path` (rename: atomic over an older socket).
    pub fn rename(&mut self, path: &Path) -> Result<()> {
        std::fs::rename(&self.path, path)
            .with_context(|| format!("moving {} to {}", self.path.display(), path.display()))?;
        self.path = path.to_path_buf();
        Ok(())
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        remove_if_same(&self.path, self.inode);
    }
}

/// The inode of the file at `path`, to tell later whether it is still
/// the one this process made (a rename keeps it; a successor's socket
/// renamed over it has another).
pub fn inode_of(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|meta| meta.ino())
}

/// Removes the file at `path` if it is still the one of `inode`.
pub fn remove_if_same(path: &Path, inode: Option<u64>) {
    if inode.is_some() && inode_of(path) == inode {
        let _ = std::fs::remove_file(path);
    }
}

fn seqpacket() -> Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("creating a unix socket")
}

fn set_blocking(fd: &OwnedFd) -> Result<()> {
    let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) & !nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// A descriptor handed from one process to its successor, named by what it
/// is (`tcp 127.0.0.1:15001`, `udp-flow`), with what else the successor
/// must know of it.
pub struct Handed {
    pub role: String,
    pub detail: serde_json::Value,
    pub fd: OwnedFd,
}

/// What a running service offers its successor: duplicates of its
/// descriptors, so that it can go on serving until the successor commits.
#[derive(Default)]
pub struct Bequest {
    pub items: Vec<Handed>,
}

impl Bequest {
    /// Adds a duplicate of `fd` as `role`.
    pub fn give(
        &mut self,
        role: String,
        detail: serde_json::Value,
        fd: BorrowedFd<'_>,
    ) -> Result<()> {
        let fd = fd
            .try_clone_to_owned()
            .with_context(|| format!("duplicating the descriptor of {role}"))?;
        self.items.push(Handed { role, detail, fd });
        Ok(())
    }
}

/// What a successor received, taken piece by piece while it prepares
/// (`&self`: the run context that carries it is shared).
#[derive(Default)]
pub struct Inheritance {
    items: std::cell::RefCell<Vec<Handed>>,
    taken: std::cell::RefCell<Vec<String>>,
}

impl Inheritance {
    pub fn new(items: Vec<Handed>) -> Inheritance {
        Inheritance {
            items: std::cell::RefCell::new(items),
            taken: Default::default(),
        }
    }

    /// Adds what arrived later (the UDP flows, at the commit).
    pub fn extend(&self, items: Vec<Handed>) {
        self.items.borrow_mut().extend(items);
    }

    /// The descriptor handed as `role`, if any (taken once).
    pub fn take(&self, role: &str) -> Option<OwnedFd> {
        let mut items = self.items.borrow_mut();
        let index = items.iter().position(|item| item.role == role)?;
        self.taken.borrow_mut().push(role.to_owned());
        Some(items.remove(index).fd)
    }

    /// Every item handed as `role`.
    pub fn take_all(&self, role: &str) -> Vec<Handed> {
        let mut items = self.items.borrow_mut();
        let (wanted, rest) = std::mem::take(&mut *items)
            .into_iter()
            .partition(|item| item.role == role);
        *items = rest;
        wanted
    }

    /// The roles of the descriptors `take` handed out so far.
    pub fn taken(&self) -> Vec<String> {
        self.taken.borrow().clone()
    }
}

/// The role of a listening TCP socket at `addr`.
pub fn tcp_listener_role(addr: std::net::SocketAddr, transparent: bool) -> String {
    match transparent {
        true => format!("tcp-transparent {addr}"),
        false => format!("tcp {addr}"),
    }
}

/// The role of a bound UDP socket at `addr`.
pub fn udp_socket_role(addr: std::net::SocketAddr) -> String {
    format!("udp {addr}")
}
