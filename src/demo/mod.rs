//! `proxy-redirect demo`: `redirect` end to end on a private network that
//! the demo builds and removes: a client and a server network namespace
//! joined by a veth pair, and a child cgroup for the client. It never
//! attaches anything to the host's root cgroup or to a real interface.

pub mod servers;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::out;
use crate::sys::cgroup::{self, ChildCgroup};
use crate::sys::netns::{self, NetNs};
use crate::sys::privileges;

const CLIENT_V4: &str = "10.203.0.1";
const SERVER_V4: &str = "10.203.0.2";
const CLIENT_V6: &str = "fd03::1";
const SERVER_V6: &str = "fd03::2";

#[derive(Args, Debug)]
#[command(after_help = "\
The demo creates network namespaces pr-demo-<pid>-client and -server, a cgroup
proxy-redirect-demo-<pid> under the cgroup2 root with children apps and proxy,
runs `proxy-redirect redirect -v` for apps with the built-in proxy, sends curl
requests from apps over IPv4, IPv6 and a v4-mapped dual-stack socket, shows
the events and statistics, and removes everything. Needs root and curl.")]
pub struct DemoArgs {}

/// Everything the demo creates, removed in reverse order on drop.
struct Network {
    apps: ChildCgroup,
    proxy: ChildCgroup,
    parent: ChildCgroup,
    client: NetNs,
    server: NetNs,
}

impl Network {
    fn create() -> Result<Network> {
        let name = format!("pr-demo-{}", std::process::id());
        let client = NetNs::create(&format!("{name}-client"))?;
        let server = NetNs::create(&format!("{name}-server"))?;
        netns::veth_pair(&client, "veth-client", &server, "veth-server")?;
        client.configure(
            "veth-client",
            &[&format!("{CLIENT_V4}/24"), &format!("{CLIENT_V6}/64")],
        )?;
        server.configure(
            "veth-server",
            &[&format!("{SERVER_V4}/24"), &format!("{SERVER_V6}/64")],
        )?;
        let root = cgroup::cgroup2_mount()?;
        let parent = ChildCgroup::create(
            &root,
            &format!("proxy-redirect-demo-{}", std::process::id()),
        )?;
        let apps = ChildCgroup::create(parent.path(), "apps")?;
        let proxy = ChildCgroup::create(parent.path(), "proxy")?;
        Ok(Network {
            apps,
            proxy,
            parent,
            client,
            server,
        })
    }
}

pub fn run(_args: &DemoArgs) -> Result<()> {
    privileges::require_bpf("demo")?;
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        bail!("the demo needs curl (sudo apt-get install curl, or sudo make deps)");
    }
    let network = Network::create().context("building the demo network")?;
    out!("== Demo network ==");
    out!(
        "  client netns {} ({CLIENT_V4}, {CLIENT_V6})",
        network.client.name()
    );
    out!(
        "  server netns {} ({SERVER_V4}, {SERVER_V6}), HTTP on port 80",
        network.server.name()
    );
    out!(
        "  cgroup       {} (apps: redirected, proxy: the proxy)",
        network.parent.path().display()
    );
    let server = servers::http(&network.server, "[::]:80")?;

    out!("\n== Starting: proxy-redirect redirect -c <apps> -v ==");
    let redirector = start_redirector(&network)?;
    for (label, url) in [
        ("IPv4", format!("http://{SERVER_V4}/")),
        ("IPv6", format!("http://[{SERVER_V6}]/")),
        (
            "dual-stack socket to a v4-mapped address",
            format!("http://[::ffff:{SERVER_V4}]/"),
        ),
    ] {
        out!("\n== curl {url}  ({label}, from the apps cgroup) ==");
        let output = netns::command_in("curl", Some(&network.client), Some(&network.apps))?
            .args(["-sS", "--max-time", "10", &url])
            .output()
            .context("running curl")?;
        let body = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() || body.is_empty() {
            bail!(
                "curl {url} failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        out!("server answered: {}", body.trim());
        std::thread::sleep(Duration::from_millis(100));
    }
    out!(
        "\n(the server saw the proxy's connections: {} in all)",
        server.peers().len()
    );

    out!("\n== Stopping the redirector (SIGINT) ==");
    redirector.stop()?;
    drop(server);
    drop(network);
    out!("\n== Removed the namespaces and the cgroup; nothing is attached ==");
    Ok(())
}

/// The redirector as its own process in the client netns and the proxy
/// cgroup; its output is echoed with a prefix.
struct Redirector {
    child: Child,
    echo: std::thread::JoinHandle<()>,
}

fn start_redirector(network: &Network) -> Result<Redirector> {
    let exe = std::env::current_exe().context("finding this program")?;
    let mut child = netns::command_in(
        &exe.display().to_string(),
        Some(&network.client),
        Some(&network.proxy),
    )?
    .args(["redirect", "-v", "-c"])
    .arg(network.apps.path())
    .arg("--sockopt-cgroup")
    .arg(network.parent.path())
    .stdout(Stdio::piped())
    .spawn()
    .context("starting the redirector")?;
    let stdout = child.stdout.take().context("redirector stdout")?;
    let (ready_tx, ready_rx) = mpsc::channel();
    let echo = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("Attached") {
                let _ = ready_tx.send(());
            }
            out!("  | {line}");
        }
    });
    if ready_rx.recv_timeout(Duration::from_secs(20)).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        bail!("the redirector did not start (its error is above)");
    }
    Ok(Redirector { child, echo })
}

impl Redirector {
    fn stop(mut self) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)?;
        let status = self.child.wait()?;
        let _ = self.echo.join();
        if !status.success() {
            bail!("the redirector exited with {status}");
        }
        Ok(())
    }
}
