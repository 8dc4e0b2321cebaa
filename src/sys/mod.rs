//! The system below the datapaths: cgroups, network namespaces, BPF links
//! and interfaces, routes, privileges, socket options, signals, the run
//! directory and resource limits.

pub mod cgroup;
pub mod clock;
pub mod handover;
pub mod interface_watch;
pub mod links;
pub mod local_route;
pub mod netns;
pub mod notify;
pub mod pins;
pub mod privileges;
pub mod rlimit;
pub mod run_dir;
pub mod shutdown;
pub mod sockopt;
pub mod trusted_file;
