//! The demo's second part: the service runs redirect (with the built-in
//! proxy), bypass and port-nat from one file; it is upgraded in the middle
//! of two transfers and a stream of short requests, then killed in the
//! middle of another transfer and started again. Every byte comes back and
//! no request fails, because the listening sockets are handed over and the
//! links and kernel state are pinned on a bpffs that the demo mounts for
//! itself and removes.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::{Echoed, Network, CLIENT_V4, SERVER_V4};
use crate::out;
use crate::sys::netns::{self, NetNs};
use crate::sys::pins::PrivateBpffs;

const TRANSFER_BYTES: usize = 20_000_000;
/// Short requests from the apps cgroup during the upgrade, 50 a second.
const REQUESTS: usize = 250;

/// A root-only directory with a bpffs mounted in it, removed on drop.
struct Workspace {
    dir: PathBuf,
    bpffs: Option<PrivateBpffs>,
}

impl Workspace {
    fn create() -> Result<Workspace> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = std::env::temp_dir().join(format!("proxy-redirect-demo-{}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let mut workspace = Workspace { dir, bpffs: None };
        workspace.bpffs = Some(PrivateBpffs::mount_on(&workspace.dir.join("bpffs"))?);
        Ok(workspace)
    }

    fn pin_dir(&self) -> PathBuf {
        self.bpffs
            .as_ref()
            .map(PrivateBpffs::pin_dir)
            .unwrap_or_default()
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        // Unmounted before the directory goes.
        drop(self.bpffs.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pseudo_random(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e3779b97f4a7c15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn config(network: &Network) -> String {
    format!(
        "# The demo's service: a sidecar-like proxy for the apps cgroup, the
# app-to-proxy hop bypassed, and a port translated on the client's veth.
[redirect]
cgroup = \"{apps}\"
sockopt-cgroup = \"{parent}\"
ports = [80]
when-proxy-down = \"closed\"

[bypass]
cgroup = \"{parent}\"

[[port-nat]]
interface = \"veth-client\"
from = [8081]
to = [18080]
",
        apps = network.apps.path().display(),
        parent = network.parent.path().display(),
    )
}

fn start_service(network: &Network, config: &Path, pin_dir: &Path) -> Result<Echoed> {
    let mut command = super::this_program(network)?;
    command
        .args(["run", "--config"])
        .arg(config)
        .arg("--pin-dir")
        .arg(pin_dir);
    Echoed::start(command, "Service running", "the service")
}

/// A curl that POSTs `upload` to `url` at 4 MB/s and writes the echo to
/// `download`.
struct Transfer {
    child: Child,
    download: PathBuf,
    what: &'static str,
}

impl Transfer {
    fn start(
        what: &'static str,
        netns: &NetNs,
        cgroup: Option<&crate::sys::cgroup::ChildCgroup>,
        upload: &Path,
        url: &str,
    ) -> Result<Transfer> {
        let download = upload.with_extension(format!("echo-{}", what.replace(' ', "-")));
        let child = netns::command_in("curl", Some(netns), cgroup)?
            .args(["-sS", "--fail", "--max-time", "60", "-H", "Expect:"])
            .args(["--limit-rate", "4M", "--data-binary"])
            .arg(format!("@{}", upload.display()))
            .arg("-o")
            .arg(&download)
            .arg(url)
            .spawn()
            .context("running curl")?;
        Ok(Transfer {
            child,
            download,
            what,
        })
    }

    fn still_running(&mut self) -> Result<bool> {
        Ok(self.child.try_wait()?.is_none())
    }

    /// Waits for the end and checks every byte of the echo.
    fn check(mut self, data: &[u8], through: &str) -> Result<()> {
        let status = self.child.wait()?;
        let echoed = std::fs::read(&self.download).unwrap_or_default();
        if !status.success() || echoed != data {
            bail!(
                "the transfer {} did not survive {through}: {} of {} bytes came back",
                self.what,
                echoed.len(),
                data.len()
            );
        }
        out!(
            "all {} MB {} came back intact",
            data.len() / 1_000_000,
            self.what
        );
        Ok(())
    }
}

/// REQUESTS short requests from the apps cgroup, one new connection each,
/// 50 a second (`curl --rate`); their status codes, one per line.
fn start_requests(network: &Network) -> Result<Child> {
    netns::command_in("curl", Some(&network.client), Some(&network.apps))?
        .args(["-s", "--max-time", "2", "--rate", "50/s", "-o", "/dev/null"])
        .args(["-w", "%{http_code}\\n"])
        .arg(format!("http://{SERVER_V4}/?[1-{REQUESTS}]"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running curl")
}

pub fn run(network: &Network) -> Result<()> {
    out!(
        "\n== The service: redirect, bypass and port-nat 8081 -> 18080 from one file, \
         upgraded and then killed in the middle of traffic =="
    );
    let workspace = Workspace::create()?;
    let config_path = workspace.dir.join("config.toml");
    let text = config(network);
    std::fs::write(&config_path, &text)?;
    for line in text.lines() {
        out!("  {line}");
    }
    let _echo = super::servers::http(&network.client, &format!("{CLIENT_V4}:18080"))?;
    let pin_dir = workspace.pin_dir();
    let mut service = start_service(network, &config_path, &pin_dir)?;

    let data = pseudo_random(TRANSFER_BYTES);
    let upload = workspace.dir.join("upload");
    std::fs::write(&upload, &data)?;
    out!(
        "\n== Traffic: {} MB each way through the proxy (apps -> http://{SERVER_V4}/), \
         {} MB through port-nat (server -> http://{CLIENT_V4}:8081/), and {REQUESTS} \
         short requests from apps, 50 a second ==",
        TRANSFER_BYTES / 1_000_000,
        TRANSFER_BYTES / 1_000_000
    );
    let through_port_nat = || {
        Transfer::start(
            "through port-nat",
            &network.server,
            None,
            &upload,
            &format!("http://{CLIENT_V4}:8081/"),
        )
    };
    let mut proxied = Transfer::start(
        "through the proxy",
        &network.client,
        Some(&network.apps),
        &upload,
        &format!("http://{SERVER_V4}/"),
    )?;
    let translated = through_port_nat()?;
    let requests = start_requests(network)?;
    std::thread::sleep(Duration::from_millis(1500));

    out!(
        "\n== Upgrade (SIGUSR2, as `proxy-redirect upgrade` sends): the binary on disk \
         (here the same build) takes the sockets and pins over =="
    );
    let old = service.pid();
    let new = service.upgrade()?;
    if !proxied.still_running()? {
        bail!("the transfer through the proxy ended before the upgrade, so it proved nothing");
    }
    out!("(pid {new} serves now; pid {old} drains the transfer it relays, which goes on)");
    proxied.check(&data, "the upgrade")?;
    translated.check(&data, "the upgrade")?;
    let codes = requests.wait_with_output()?;
    let codes = String::from_utf8_lossy(&codes.stdout);
    let answered = codes.lines().filter(|code| *code == "200").count();
    out!("{answered} of {REQUESTS} short requests answered by the server through the proxy, none refused");
    if answered != REQUESTS {
        bail!("only {answered} of {REQUESTS} requests were answered across the upgrade");
    }
    service.wait_for("Drained:", Duration::from_secs(60));

    out!("\n== kill -9 the service, in the middle of another transfer through port-nat ==");
    let mut translated = through_port_nat()?;
    std::thread::sleep(Duration::from_millis(1500));
    service.kill()?;
    let status = std::process::Command::new(std::env::current_exe()?)
        .args(["status", "--pin-dir"])
        .arg(&pin_dir)
        .output()?;
    out!(
        "proxy-redirect status says: {}",
        String::from_utf8_lossy(&status.stderr).trim()
    );

    out!("\n== Starting the service again: it adopts the pinned links, flows and sockets ==");
    let service = start_service(network, &config_path, &pin_dir)?;
    if !translated.still_running()? {
        bail!("the transfer ended before the service was back, so it proved nothing");
    }
    out!("(the transfer is still going: it was never cut)");
    translated.check(&data, "the crash")?;
    out!(
        "(the flow outlived the process that made it; the counters too: see \"dropped\" \
         and \"untracked replies\" below)"
    );

    out!("\n== Stopping the service for good (SIGTERM): it removes its pins ==");
    service.stop(nix::sys::signal::Signal::SIGTERM)?;
    if pin_dir.exists() {
        bail!("the service left {}", pin_dir.display());
    }
    Ok(())
}
