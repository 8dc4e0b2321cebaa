//! The `proxy-redirect` command line: parse, dispatch, report errors in one line.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use proxy_redirect::datapath::Settings;
use proxy_redirect::datapath::{bypass, port_nat, proxy, redirect, tproxy};
use proxy_redirect::err_out;
use proxy_redirect::telemetry::status;
use proxy_redirect::{demo, service};

#[derive(Parser, Debug)]
#[command(
    name = "proxy-redirect",
    version,
    about = "Steer TCP traffic transparently with eBPF: no iptables, no change to the applications",
    long_about = None,
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Send outbound TCP connections of a cgroup to a local proxy (cgroup connect4/6)
    Redirect(redirect::RedirectArgs),
    /// Run the built-in transparent proxy alone (works behind iptables REDIRECT too)
    Proxy(proxy::ProxyArgs),
    /// Let TCP between two sockets of this host skip the TCP/IP stack (sockops + sk_msg)
    Bypass(bypass::BypassArgs),
    /// Translate a destination port on an interface (8080 -> 80) with TC programs
    PortNat(port_nat::PortNatArgs),
    /// Intercept TCP arriving on an interface (a gateway) for a transparent proxy (TC + bpf_sk_assign)
    Tproxy(tproxy::TproxyArgs),
    /// Run any set of the datapaths above as one service, from a TOML file (SIGHUP reloads)
    Run(service::RunArgs),
    /// Show what a running service (`run`) has attached, and its counters
    Status(status::StatusArgs),
    /// Hand the running service over to the binary now on disk, without dropping a connection
    Upgrade(service::upgrade::UpgradeArgs),
    /// Remove the datapaths a killed service left pinned in bpffs
    Cleanup(service::cleanup::CleanupArgs),
    /// Show `redirect` end to end in private namespaces and a child cgroup, then clean up
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => {
            // --help and --version
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            // clap's first line says what is wrong; the usage lines after it
            // are what --help is for.
            let rendered = err.render().to_string();
            err_out!("{}", rendered.lines().next().unwrap_or("invalid arguments"));
            return ExitCode::from(2);
        }
    };
    let stopped = |result: anyhow::Result<()>| result.map(|()| ExitCode::SUCCESS);
    let result = match &cli.command {
        Command::Redirect(args) => stopped(service::run_one(
            Settings::Redirect(args.clone()),
            &args.output,
        )),
        Command::Proxy(args) => stopped(service::run_one(
            Settings::Proxy(args.clone()),
            &args.output(),
        )),
        Command::Bypass(args) => stopped(service::run_one(
            Settings::Bypass(args.clone()),
            &args.output,
        )),
        Command::PortNat(args) => stopped(service::run_one(
            Settings::PortNat(args.clone()),
            &args.output,
        )),
        Command::Tproxy(args) => stopped(service::run_one(
            Settings::Tproxy(args.clone()),
            &args.output,
        )),
        Command::Run(args) => stopped(service::run(args)),
        Command::Status(args) => stopped(status::run(args)),
        Command::Upgrade(args) => stopped(service::upgrade::run(args)),
        Command::Cleanup(args) => stopped(service::cleanup::run(args)),
        Command::Demo(args) => stopped(demo::run(args)),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            err_out!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
