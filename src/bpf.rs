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
