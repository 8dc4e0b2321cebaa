//! `proxy-redirect demo`: `redirect` end to end, then the service running
//! redirect, bypass and port-nat through an upgrade and a crash, on a
//! private network that the demo builds and removes: a client and a server
//! network namespace joined by a veth pair, a child cgroup for the client,
//! and a bpffs of its own. It never attaches anything to the host's root
//! cgroup or to a real interface.

pub mod servers;
mod service;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
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
requests from apps over IPv4, IPv6 and a v4-mapped dual-stack socket, and
shows the events and statistics. Then it runs the service (`run --config`)
with redirect, bypass and port-nat 8081 -> 18080 on the client's veth,
pinned on a bpffs it mounts in a directory of its own under /tmp; upgrades
it (SIGUSR2) in the middle of two 20 MB transfers and a stream of short
requests, then kills it with SIGKILL in the middle of another transfer and
starts it again, and checks that every byte came back and no request
failed. Everything is removed at the end. Needs root and curl.")]
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
    redirector.stop(nix::sys::signal::Signal::SIGINT)?;
    service::run(&network)?;
    drop(server);
    drop(network);
    out!("\n== Removed the namespaces and the cgroup; nothing is attached ==");
    Ok(())
}

/// This program, to run in the client netns and the `proxy` cgroup.
fn this_program(network: &Network) -> Result<Command> {
    let exe = std::env::current_exe().context("finding this program")?;
    netns::command_in(
        &exe.display().to_string(),
        Some(&network.client),
        Some(&network.proxy),
    )
}

fn start_redirector(network: &Network) -> Result<Echoed> {
    let mut command = this_program(network)?;
    command
        .args(["redirect", "-v", "-c"])
        .arg(network.apps.path())
        .arg("--sockopt-cgroup")
        .arg(network.parent.path());
    Echoed::start(command, "Attached", "the redirector")
}

/// A proxy-redirect of the demo's, as its own process; its output is
/// echoed with a prefix. After an upgrade it is the process that took
/// over, which writes to the same pipe.
struct Echoed {
    child: Child,
    successor: Option<nix::unistd::Pid>,
    lines: mpsc::Receiver<String>,
    echo: std::thread::JoinHandle<()>,
    what: &'static str,
}

impl Echoed {
    /// Starts `command`, ready once it prints a line starting with `ready`.
    fn start(mut command: Command, ready: &'static str, what: &'static str) -> Result<Echoed> {
        let mut child = command
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let stdout = child.stdout.take().context("stdout")?;
        let (lines_tx, lines) = mpsc::channel();
        let echo = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                out!("  | {line}");
                let _ = lines_tx.send(line);
            }
        });
        let mut echoed = Echoed {
            child,
            successor: None,
            lines,
            echo,
            what,
        };
        if echoed.wait_for(ready, Duration::from_secs(20)).is_none() {
            let _ = echoed.child.kill();
            let _ = echoed.child.wait();
            bail!("{what} did not start (its error is above)");
        }
        Ok(echoed)
    }

    /// The next line starting with `prefix`, within `timeout`.
    fn wait_for(&self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self.lines.recv_timeout(left).ok()?;
            if line.starts_with(prefix) {
                return Some(line);
            }
        }
    }

    fn pid(&self) -> nix::unistd::Pid {
        self.successor
            .unwrap_or(nix::unistd::Pid::from_raw(self.child.id() as i32))
    }

    /// SIGUSR2: the service starts the binary on disk, which takes over;
    /// returns the new process's pid once it serves.
    fn upgrade(&mut self) -> Result<u32> {
        // The new process becomes the demo's once the old one exits, to
        // be waited for.
        // SAFETY: a plain prctl on this process.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGUSR2)?;
        let offered = self
            .wait_for("Hand-over: pid ", Duration::from_secs(60))
            .context("no new process asked to take over")?;
        let pid: i32 = offered["Hand-over: pid ".len()..]
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .context("a hand-over line without a pid")?;
        self.wait_for("Service running", Duration::from_secs(60))
            .context("the new process never served")?;
        self.successor = Some(nix::unistd::Pid::from_raw(pid));
        Ok(pid as u32)
    }

    fn stop(mut self, signal: nix::sys::signal::Signal) -> Result<()> {
        nix::sys::signal::kill(self.pid(), signal)?;
        let success = match self.successor.take() {
            Some(pid) => matches!(
                nix::sys::wait::waitpid(pid, None)?,
                nix::sys::wait::WaitStatus::Exited(_, 0)
            ),
            None => self.child.wait()?.success(),
        };
        // An old process that handed over exits once it has drained.
        let old = self.child.wait()?;
        let _ = self.echo.join();
        if !success || !old.success() {
            bail!("{} did not stop cleanly", self.what);
        }
        Ok(())
    }

    /// SIGKILL, as a crash would.
    fn kill(mut self) -> Result<()> {
        if let Some(pid) = self.successor.take() {
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)?;
            nix::sys::wait::waitpid(pid, None)?;
        }
        let _ = self.child.kill();
        self.child.wait()?;
        let _ = self.echo.join();
        Ok(())
    }
}
