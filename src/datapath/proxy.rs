//! `proxy-redirect proxy`: the built-in TCP relay alone, as a datapath
//! without BPF programs (it works behind iptables REDIRECT or TPROXY too).

use std::net::SocketAddr;

use anyhow::Result;
use clap::Args;

use crate::cli::{self, OutputArgs};
use crate::out;
use crate::relay::tcp::{
    default_listen_addrs, BoundProxy, ProxyConfig, RelayArgs, RunningProxy, STOP_GRACE,
};
use crate::runtime::{Datapath, EventSource, RunContext};
use crate::sys::privileges;
use crate::telemetry::stats::Snapshot;

#[derive(Args, Debug, Clone)]
pub struct ProxyArgs {
    /// Address to listen on (repeat for several)
    #[arg(short, long = "listen", value_name = "ADDR:PORT",
          default_values_t = default_listen_addrs(15001))]
    pub listen: Vec<SocketAddr>,
    /// Mark (SO_MARK) of upstream connections, which `redirect` never redirects
    #[arg(long, default_value = "0x5052", value_parser = cli::parse_mark)]
    pub mark: u32,
    /// Be a TPROXY target (iptables TPROXY, `tproxy --no-proxy`): listen with
    /// IP_TRANSPARENT and relay each connection to its own local address
    /// instead of asking SO_ORIGINAL_DST
    #[arg(long)]
    pub transparent: bool,
    #[command(flatten)]
    pub relay: RelayArgs,
    /// Serve the statistics as Prometheus metrics on http://ADDR/metrics
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
}

impl ProxyArgs {
    /// The proxy alone streams no events; it serves metrics when asked.
    pub fn output(&self) -> OutputArgs {
        OutputArgs {
            metrics: self.metrics,
            ..OutputArgs::default()
        }
    }
}

pub fn check(args: &ProxyArgs) -> Result<()> {
    privileges::require_proxy(args.mark, args.transparent)
}

/// The built-in proxy on its own, as a datapath without BPF programs.
pub struct Proxy {
    args: ProxyArgs,
    bound: Option<BoundProxy>,
    addrs: Vec<SocketAddr>,
    running: Option<RunningProxy>,
}

impl Proxy {
    pub fn prepare(args: &ProxyArgs) -> Result<Proxy> {
        check(args)?;
        let config = ProxyConfig::new(args.mark, args.transparent, &args.relay);
        let bound = BoundProxy::bind(&args.listen, config, &Default::default())?;
        Ok(Proxy {
            args: args.clone(),
            addrs: bound.local_addrs(),
            bound: Some(bound),
            running: None,
        })
    }
}

impl Datapath for Proxy {
    fn name(&self) -> String {
        "proxy".into()
    }

    fn attach(&mut self, ctx: &RunContext) -> Result<()> {
        let addrs: Vec<String> = self.addrs.iter().map(|a| a.to_string()).collect();
        out!(
            "Proxy listening on {} (upstream mark {:#x}{})",
            addrs.join(", "),
            self.args.mark,
            if self.args.transparent {
                ", transparent"
            } else {
                ""
            }
        );
        if let Some(bound) = self.bound.take() {
            self.running = Some(bound.start_on(ctx.proxy_runtime()?)?);
        }
        Ok(())
    }

    fn attach_mode(&self) -> String {
        "none".into()
    }

    fn events(&self, _ctx: &RunContext) -> Result<Option<EventSource>> {
        Ok(None)
    }

    fn snapshots(&self) -> Result<Vec<Snapshot>> {
        Ok(self.running.iter().map(|p| p.stats.snapshot()).collect())
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({"name": self.name(), "listen": self.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>()})
    }

    fn stop(&mut self) {
        if let Some(running) = &mut self.running {
            running.stop(STOP_GRACE);
        }
    }

    fn print_statistics(&self) -> Result<()> {
        if let Some(running) = &self.running {
            running.stats.print();
        }
        Ok(())
    }
}
