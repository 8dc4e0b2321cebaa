//! The generated skeletons, one module per `bpf/<name>.bpf.c`.

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
