//! The demo's second part: the service running port-nat is killed in the
//! middle of a transfer and started again, and the transfer goes on,
//! because the links and the flow table are pinned on a bpffs that the
//! demo mounts for itself and removes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::{Echoed, Network, SERVER_V4};
use crate::out;
use crate::sys::netns;
use crate::sys::pins::PrivateBpffs;

const TRANSFER_BYTES: usize = 20_000_000;

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

fn start_service(network: &Network, config: &Path, pin_dir: &Path) -> Result<Echoed> {
    let exe = std::env::current_exe().context("finding this program")?;
    let mut command = netns::command_in(&exe.display().to_string(), Some(&network.server), None)?;
    command
        .args(["run", "--config"])
        .arg(config)
        .arg("--pin-dir")
        .arg(pin_dir);
    Echoed::start(command, "Service running", "the service")
}

pub fn run(network: &Network) -> Result<()> {
    out!(
        "\n== The service across a crash: port-nat 8081 -> 80 on the server's veth, \
         killed in the middle of a transfer =="
    );
    let workspace = Workspace::create()?;
    let config = workspace.dir.join("config.toml");
    std::fs::write(
        &config,
        "[[port-nat]]\ninterface = \"veth-server\"\nfrom = [8081]\nto = [80]\n",
    )?;
    let pin_dir = workspace.pin_dir();
    let service = start_service(network, &config, &pin_dir)?;

    let data = pseudo_random(TRANSFER_BYTES);
    let (upload, download) = (workspace.dir.join("upload"), workspace.dir.join("download"));
    std::fs::write(&upload, &data)?;
    let url = format!("http://{SERVER_V4}:8081/");
    out!(
        "\n== curl: {} MB to {url} and back, at 4 MB/s each way ==",
        TRANSFER_BYTES / 1_000_000
    );
    let mut transfer = netns::command_in("curl", Some(&network.client), None)?
        .args(["-sS", "--fail", "--max-time", "30", "-H", "Expect:"])
        .args(["--limit-rate", "4M", "--data-binary"])
        .arg(format!("@{}", upload.display()))
        .arg("-o")
        .arg(&download)
        .arg(&url)
        .spawn()
        .context("running curl")?;
    std::thread::sleep(Duration::from_millis(1500));

    out!("\n== kill -9 the service, mid-transfer ==");
    service.kill()?;
    let status = std::process::Command::new(std::env::current_exe()?)
        .args(["status", "--pin-dir"])
        .arg(&pin_dir)
        .output()?;
    out!(
        "proxy-redirect status says: {}",
        String::from_utf8_lossy(&status.stderr).trim()
    );

    out!("\n== Starting the service again: it adopts the pinned links and flows ==");
    let service = start_service(network, &config, &pin_dir)?;
    if transfer.try_wait()?.is_some() {
        bail!("the transfer ended before the service was back, so it proved nothing");
    }
    out!("(the transfer is still going: it was never cut)");
    let finished = transfer.wait_with_output()?;
    let echoed = std::fs::read(&download).unwrap_or_default();
    if !finished.status.success() || echoed != data {
        bail!(
            "the transfer through port-nat did not survive the crash: {} of {} bytes came back",
            echoed.len(),
            data.len()
        );
    }
    out!(
        "\nall {} MB came back intact: the flow outlived the process that made it \
         (its counters too: see \"dropped\" and \"untracked replies\" below)",
        data.len() / 1_000_000
    );

    out!("\n== Stopping the service for good (SIGTERM): it removes its pins ==");
    service.stop(nix::sys::signal::Signal::SIGTERM)?;
    if pin_dir.exists() {
        bail!("the service left {}", pin_dir.display());
    }
    Ok(())
}
