//! What the datapaths tell: counters as data, event helpers, Prometheus
//! metrics, the status page and the server of both.

pub mod events;
pub mod metrics;
pub mod output;
pub mod page_server;
pub mod stats;
pub mod status;
