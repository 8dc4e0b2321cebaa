//! The registry: the one place, besides `main.rs`, that names every
//! datapath. It turns a subcommand's or a config section's arguments into
//! `Settings`, prepares them into a `Running` datapath, and pairs a running
//! datapath with its new settings on a reload. The service above sees only
//! the `runtime` traits these implement.

pub mod bypass;
pub mod port_nat;
pub mod proxy;
pub mod redirect;
pub mod tproxy;

use anyhow::{anyhow, bail, Result};
use toml::Table;

use crate::cli::toml::section_args;
use bypass::{Bypass, BypassArgs};
use port_nat::{PortNat, PortNatArgs};
use proxy::{Proxy, ProxyArgs};

use crate::runtime::{Datapath, DatapathSettings, RunContext, RunningDatapath};
use redirect::{Redirect, RedirectArgs};
use tproxy::{Tproxy, TproxyArgs};

/// The settings of one datapath, from the command line or a config section.
#[derive(Debug, Clone)]
pub enum Settings {
    Redirect(RedirectArgs),
    Bypass(BypassArgs),
    PortNat(PortNatArgs),
    Tproxy(TproxyArgs),
    /// The built-in proxy alone (the `proxy` subcommand; not in config files).
    Proxy(ProxyArgs),
}

/// A prepared or running datapath, of the kind its settings name.
pub enum Running {
    Redirect(Box<Redirect>),
    Bypass(Box<Bypass>),
    PortNat(Box<PortNat>),
    Tproxy(Box<Tproxy>),
    Proxy(Box<Proxy>),
}

impl DatapathSettings for Settings {
    type Running = Running;

    fn name(&self) -> String {
        match self {
            Settings::Redirect(_) => "redirect".into(),
            Settings::Bypass(_) => "bypass".into(),
            Settings::PortNat(args) => format!("port-nat {}", args.interface),
            Settings::Tproxy(_) => "tproxy".into(),
            Settings::Proxy(_) => "proxy".into(),
        }
    }

    fn check(&self) -> Result<()> {
        match self {
            Settings::Redirect(args) => redirect::check(args),
            Settings::Bypass(args) => bypass::check(args),
            Settings::PortNat(args) => port_nat::check(args),
            Settings::Tproxy(args) => tproxy::check(args),
            Settings::Proxy(args) => proxy::check(args),
        }
    }

    fn prepare(&self, ctx: &RunContext) -> Result<Running> {
        Ok(match self {
            Settings::Redirect(args) => Running::Redirect(Box::new(Redirect::prepare(args, ctx)?)),
            Settings::Bypass(args) => Running::Bypass(Box::new(Bypass::prepare(args, ctx)?)),
            Settings::PortNat(args) => Running::PortNat(Box::new(PortNat::prepare(args, ctx)?)),
            Settings::Tproxy(args) => Running::Tproxy(Box::new(Tproxy::prepare(args, ctx)?)),
            Settings::Proxy(args) => Running::Proxy(Box::new(Proxy::prepare(args)?)),
        })
    }
}

impl Settings {
    /// The interfaces whose TC hooks these settings take, each with the key
    /// that names it.
    pub fn tc_interfaces(&self) -> Vec<(&'static str, &str)> {
        match self {
            Settings::PortNat(args) => vec![("interface", &args.interface)],
            Settings::Tproxy(args) => {
                let mut interfaces = vec![("interface", args.interface.as_str())];
                if let Some(upstream) = &args.upstream_interface {
                    interfaces.push(("upstream-interface", upstream));
                }
                interfaces
            }
            Settings::Redirect(_) | Settings::Bypass(_) | Settings::Proxy(_) => Vec::new(),
        }
    }
}

impl RunningDatapath for Running {
    type Settings = Settings;

    fn datapath(&self) -> &dyn Datapath {
        match self {
            Running::Redirect(datapath) => datapath.as_ref(),
            Running::Bypass(datapath) => datapath.as_ref(),
            Running::PortNat(datapath) => datapath.as_ref(),
            Running::Tproxy(datapath) => datapath.as_ref(),
            Running::Proxy(datapath) => datapath.as_ref(),
        }
    }

    fn datapath_mut(&mut self) -> &mut dyn Datapath {
        match self {
            Running::Redirect(datapath) => datapath.as_mut(),
            Running::Bypass(datapath) => datapath.as_mut(),
            Running::PortNat(datapath) => datapath.as_mut(),
            Running::Tproxy(datapath) => datapath.as_mut(),
            Running::Proxy(datapath) => datapath.as_mut(),
        }
    }

    fn check_reload(&self, settings: &Settings) -> Result<()> {
        match (self, settings) {
            (Running::Redirect(running), Settings::Redirect(new)) => running.check_reload(new),
            (Running::Bypass(running), Settings::Bypass(new)) => running.check_reload(new),
            (Running::PortNat(running), Settings::PortNat(new)) => running.check_reload(new),
            (Running::Tproxy(running), Settings::Tproxy(new)) => running.check_reload(new),
            (Running::Proxy(_), Settings::Proxy(_)) => bail!("the proxy alone cannot be reloaded"),
            (running, new) => bail!("{} cannot become {}", running.datapath().name(), new.name()),
        }
    }

    fn reload(&mut self, settings: &Settings, ctx: &RunContext) -> Result<()> {
        self.check_reload(settings)?;
        match (self, settings) {
            (Running::Redirect(running), Settings::Redirect(new)) => running.reload(new, ctx),
            (Running::Bypass(running), Settings::Bypass(new)) => running.reload(new, ctx),
            (Running::PortNat(running), Settings::PortNat(new)) => running.reload(new, ctx),
            (Running::Tproxy(running), Settings::Tproxy(new)) => running.reload(new, ctx),
            // check_reload refused every other pair.
            _ => Ok(()),
        }
    }
}

/// A datapath section of the service's config file.
pub struct Section {
    /// `redirect` for `[redirect]`.
    pub name: &'static str,
    /// `[[port-nat]]`: one section per interface.
    pub repeats: bool,
    /// The section's keys as the subcommand's arguments; `label` names the
    /// section in errors (`[port-nat #2]`).
    pub parse: fn(label: &str, table: &Table) -> Result<Settings>,
}

/// Every datapath a config file can name, in the order a service prepares
/// and attaches them.
pub const SECTIONS: &[Section] = &[
    Section {
        name: "redirect",
        repeats: false,
        parse: |label, table| section_args(label, table).map(Settings::Redirect),
    },
    Section {
        name: "bypass",
        repeats: false,
        parse: |label, table| section_args(label, table).map(Settings::Bypass),
    },
    Section {
        name: "port-nat",
        repeats: true,
        parse: port_nat_section,
    },
    Section {
        name: "tproxy",
        repeats: false,
        parse: |label, table| section_args(label, table).map(Settings::Tproxy),
    },
];

fn port_nat_section(label: &str, table: &Table) -> Result<Settings> {
    let args: PortNatArgs = section_args(label, table)?;
    // clap cannot pair `from` with `to`; the subcommand does it in run().
    if args.from.len() != args.to.len() {
        bail!(
            "{label} from, to: {} 'from' port(s) but {} 'to' port(s); they pair up in order",
            args.from.len(),
            args.to.len()
        );
    }
    port_nat::mappings(&args.from, &args.to).map_err(|err| anyhow!("{label} from, to: {err}"))?;
    Ok(Settings::PortNat(args))
}
