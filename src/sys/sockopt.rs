//! Socket options the relays use: the original destination (as iptables
//! REDIRECT or `redirect` records it) and the mark that exempts the proxy's
//! own connections from redirection.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// `SO_ORIGINAL_DST` (level `SOL_IP`) and `IP6T_SO_ORIGINAL_DST` (level
/// `SOL_IPV6`) share this number.
pub const SO_ORIGINAL_DST: libc::c_int = 80;

fn getsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: value is a writable buffer of len bytes.
    let ret = unsafe { libc::getsockopt(fd, level, name, value.as_mut_ptr().cast(), &mut len) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised, and the kernel wrote at most len bytes.
    Ok(unsafe { value.assume_init() })
}

/// The destination the client originally asked for, on an accepted socket
/// whose local address is `local`. `Ok(None)` when no redirection recorded
/// one (ENOENT / ENOPROTOOPT).
pub fn original_destination(fd: RawFd, local: SocketAddr) -> io::Result<Option<SocketAddr>> {
    let is_ipv4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
    };
    let result = if is_ipv4 {
        getsockopt::<libc::sockaddr_in>(fd, libc::SOL_IP, SO_ORIGINAL_DST).map(|sin| {
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            ))
        })
    } else {
        getsockopt::<libc::sockaddr_in6>(fd, libc::SOL_IPV6, SO_ORIGINAL_DST).map(|sin6| {
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                0,
                0,
            ))
        })
    };
    match result {
        Ok(addr) => Ok(Some(addr)),
        Err(err) if matches!(err.raw_os_error(), Some(libc::ENOENT | libc::ENOPROTOOPT)) => {
            Ok(None)
        }
        Err(err) => Err(err),
    }
}

/// SO_NETNS_COOKIE (Linux 5.14), which the libc crate does not name.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the network namespace the socket lives in, as BPF
/// programs see it from `bpf_get_netns_cookie`.
pub fn netns_cookie(fd: RawFd) -> io::Result<u64> {
    getsockopt::<u64>(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE)
}

pub fn set_mark(fd: RawFd, mark: u32) -> io::Result<()> {
    set_int(fd, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int)
}

pub fn set_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: value is a c_int that lives across the call.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
