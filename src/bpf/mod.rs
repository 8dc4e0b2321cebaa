//! The generated skeletons, one module per `bpf/<name>.bpf.c`, and the
//! conversions every skeleton shares.

pub mod maps;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

macro_rules! skeleton {
    ($name:ident, $file:literal) => {
        #[allow(clippy::all, non_camel_case_types, non_upper_case_globals, dead_code)]
        pub mod $name {
            include!(concat!(env!("OUT_DIR"), "/", $file));
        }
    };
}

skeleton!(redirect, "redirect.skel.rs");
skeleton!(bypass, "bypass.skel.rs");
skeleton!(port_nat, "port_nat.skel.rs");
skeleton!(tproxy, "tproxy.skel.rs");

/// An address and port as the kernel hands them over (include/addr.h:
/// network byte order, an IPv4 address in the first word) as a socket
/// address.
pub fn socket_addr(family: impl Into<u32>, ip: &[u32; 4], port_be: u16) -> SocketAddr {
    let port = u16::from_be(port_be);
    if family.into() == libc::AF_INET as u32 {
        return SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip[0].to_ne_bytes())), port);
    }
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_mut(4).zip(ip) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port)
}

/// include/addr.h's `struct endpoint`, which every skeleton that uses it
/// generates as a type of its own.
pub trait Endpoint {
    fn addr(&self) -> SocketAddr;
}

macro_rules! endpoint {
    ($($skeleton:ident),*) => {
        $(impl Endpoint for $skeleton::types::endpoint {
            fn addr(&self) -> SocketAddr {
                socket_addr(self.family, &self.ip, self.port)
            }
        })*
    };
}

endpoint!(redirect, bypass, tproxy);

/// A loaded skeleton together with the object storage it borrows, so that
/// a running datapath can be one value that the service holds, reloads and
/// drops.
pub struct OwnedSkel<S> {
    skel: std::mem::ManuallyDrop<S>,
    object: *mut std::mem::MaybeUninit<libbpf_rs::OpenObject>,
}

impl<S> OwnedSkel<S> {
    /// `load` opens and loads a skeleton in the storage it is given.
    pub fn load(
        load: impl FnOnce(
            &'static mut std::mem::MaybeUninit<libbpf_rs::OpenObject>,
        ) -> anyhow::Result<S>,
    ) -> anyhow::Result<OwnedSkel<S>> {
        let object = Box::into_raw(Box::new(std::mem::MaybeUninit::uninit()));
        // SAFETY: the storage lives until drop(), which drops the skeleton
        // borrowing it first; nothing else ever reaches it.
        match load(unsafe { &mut *object }) {
            Ok(skel) => Ok(OwnedSkel {
                skel: std::mem::ManuallyDrop::new(skel),
                object,
            }),
            Err(err) => {
                // SAFETY: from Box::into_raw above; the failed load let go of it.
                drop(unsafe { Box::from_raw(object) });
                Err(err)
            }
        }
    }
}

impl<S> Drop for OwnedSkel<S> {
    fn drop(&mut self) {
        // SAFETY: the skeleton is dropped once, here, before the storage it
        // borrows, which came from Box::into_raw in load().
        unsafe {
            std::mem::ManuallyDrop::drop(&mut self.skel);
            drop(Box::from_raw(self.object));
        }
    }
}

impl<S> std::ops::Deref for OwnedSkel<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.skel
    }
}

impl<S> std::ops::DerefMut for OwnedSkel<S> {
    fn deref_mut(&mut self) -> &mut S {
        &mut self.skel
    }
}
