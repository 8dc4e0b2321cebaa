//! proxy-redirect: transparent TCP steering with eBPF.
//!
//! One module per subcommand (`redirect`, `proxy`, `tproxy`, `demo`), on top of shared
//! modules for cgroups, privileges, BPF links, maps, events and output.

pub mod bpf;
pub mod bypass;
pub mod cgroup;
pub mod cli;
pub mod datapath;
pub mod demo;
pub mod dns;
pub mod events;
pub mod interface_watch;
pub mod links;
pub mod local_route;
pub mod maps;
pub mod metrics;
pub mod netns;
pub mod page_server;
pub mod port_nat;
pub mod privileges;
pub mod proxy;
pub mod redirect;
pub mod rlimit;
pub mod run_dir;
pub mod runtime;
pub mod servers;
pub mod service;
pub mod shutdown;
pub mod sockopt;
pub mod stats;
pub mod status;
pub mod tproxy;
pub mod udp_relay;
