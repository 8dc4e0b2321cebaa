//! proxy-redirect: transparent TCP and UDP steering with eBPF.
//!
//! Imports point down only: `service` runs the datapaths that the
//! `datapath` registry names; each datapath stands on the `relay`s, the
//! `runtime` interface, and the lowest layer (`bpf`, `sys`, `telemetry`,
//! `cli`). A datapath never imports the service, the registry or another
//! datapath; `make lint` checks it (tools/check-imports.py). `demo` sits
//! beside the service and uses only the lowest layer.

pub mod bpf;
pub mod cli;
pub mod datapath;
pub mod demo;
pub mod relay;
pub mod runtime;
pub mod service;
pub mod sys;
pub mod telemetry;
