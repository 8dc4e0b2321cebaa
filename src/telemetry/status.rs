//! `proxy-redirect status`: a running service (`run --config`) answers on a
//! unix socket under /run/proxy-redirect that only root can open, with what
//! it has attached and its counters.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::out;
use crate::sys::handover;
use crate::sys::pins;
use crate::sys::run_dir::{self, RUN_DIR};
use crate::telemetry::page_server::{Answer, PageServer};

const SOCKET_NAME: &str = "status.sock";

/// The status socket of a running service.
pub struct Server {
    pages: PageServer,
    path: PathBuf,
    /// The socket file's inode: a successor's, renamed over it, is not
    /// ours to remove.
    inode: Option<u64>,
}

impl Server {
    /// The status socket, when no other service runs.
    pub fn bind() -> Result<Server> {
        if is_answering() {
            bail!(
                "another proxy-redirect service is running (see `proxy-redirect status`); \
                 one service per host (`run --take-over` takes its place)"
            );
        }
        Server::bind_at(&status_path())
    }

    /// A status socket beside the running service's, for a successor that
    /// takes its place (`take_place`) once it serves.
    pub fn bind_beside() -> Result<Server> {
        let name = format!("{SOCKET_NAME}.{}", std::process::id());
        Server::bind_at(&run_dir::create()?.join(name))
    }

    fn bind_at(path: &Path) -> Result<Server> {
        run_dir::create()?;
        // Left by a service that was killed.
        let _ = fs::remove_file(path);
        let listener = UnixListener::bind(path)
            .with_context(|| format!("creating the status socket {}", path.display()))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let pages = PageServer::spawn("status", listener, "{}".into(), Answer::Page);
        Ok(Server {
            pages,
            path: path.to_path_buf(),
            inode: handover::inode_of(path),
        })
    }

    /// Moves this socket over the running service's (atomically: a
    /// client finds one or the other).
    pub fn take_place(&mut self) -> Result<()> {
        let path = status_path();
        fs::rename(&self.path, &path)
            .with_context(|| format!("moving the status socket to {}", path.display()))?;
        self.path = path;
        Ok(())
    }

    pub fn publish(&self, page: serde_json::Value) {
        self.pages.publish(page.to_string());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        handover::remove_if_same(&self.path, self.inode);
        // Only when no tproxy holds a lock in it.
        let _ = fs::remove_dir(RUN_DIR);
    }
}

fn status_path() -> PathBuf {
    Path::new(RUN_DIR).join(SOCKET_NAME)
}

/// Whether a service answers on the status socket.
pub fn is_answering() -> bool {
    UnixStream::connect(status_path()).is_ok()
}

#[derive(Args, Debug, Clone)]
#[command(after_help = "\
Reads the status socket of the service started with `proxy-redirect run`
(/run/proxy-redirect/status.sock, root only). When no service runs, says
whether one that was killed left datapaths pinned (they keep working until
`proxy-redirect cleanup` removes them, or a new `run` adopts them).")]
pub struct StatusArgs {
    /// Print the status as one JSON object
    #[arg(long)]
    pub json: bool,
    /// The service's bpffs directory, to look for what a killed one left
    #[arg(long, value_name = "DIR", default_value = pins::DEFAULT_PIN_ROOT)]
    pub pin_dir: PathBuf,
}

/// The status page of the running service; None when none runs.
pub fn query() -> Result<Option<serde_json::Value>> {
    let path = Path::new(RUN_DIR).join(SOCKET_NAME);
    let mut stream = match UnixStream::connect(&path) {
        Ok(stream) => stream,
        Err(err) => match err.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                return Ok(None)
            }
            std::io::ErrorKind::PermissionDenied => {
                bail!("only root can read the service status ({})", path.display())
            }
            _ => return Err(err).with_context(|| format!("connecting to {}", path.display())),
        },
    };
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .context("reading the status")?;
    serde_json::from_str(&text)
        .map(Some)
        .context("the service sent a status that is not JSON")
}

pub fn run(args: &StatusArgs) -> Result<()> {
    let Some(status) = query()? else {
        let orphans = pins::pinned_datapaths(&args.pin_dir);
        if !orphans.is_empty() {
            bail!(
                "no proxy-redirect service is running, but {} holds the pinned datapaths of \
                 one that did not stop cleanly: {}; they keep working until \
                 `proxy-redirect cleanup` removes them or `proxy-redirect run` adopts them",
                args.pin_dir.display(),
                orphans.join(", ")
            );
        }
        bail!(
            "no proxy-redirect service is running ({} is not answering)",
            Path::new(RUN_DIR).join(SOCKET_NAME).display()
        )
    };
    if args.json {
        out!("{status}");
    } else {
        print_status(&status);
    }
    Ok(())
}

fn print_status(status: &serde_json::Value) {
    out!(
        "proxy-redirect {} service, pid {}",
        status["version"].as_str().unwrap_or("?"),
        status["pid"]
    );
    let upgrade = &status["upgrade"];
    if upgrade["in_progress"] == true {
        out!("an upgrade is in progress");
    }
    if let Some(why) = upgrade["last_failure"].as_str() {
        out!("upgrades failed: {} (the last: {why})", upgrade["failures"]);
    }
    for datapath in status["datapaths"].as_array().into_iter().flatten() {
        out!("{}", datapath["name"].as_str().unwrap_or("?"));
        for (key, value) in datapath.as_object().into_iter().flatten() {
            if key == "name" || key == "programs" {
                continue;
            }
            let value = match value {
                serde_json::Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            out!("  {key}: {value}");
        }
        for program in datapath["programs"].as_array().into_iter().flatten() {
            out!(
                "  program {} (id {}) on {}",
                program["program"].as_str().unwrap_or("?"),
                program["id"],
                program["target"].as_str().unwrap_or("?")
            );
        }
    }
    for snapshot in status["statistics"].as_array().into_iter().flatten() {
        let Some(object) = snapshot.as_object() else {
            continue;
        };
        out!(
            "statistics of {}",
            object["datapath"].as_str().unwrap_or("?")
        );
        for (key, value) in object {
            if key != "datapath" {
                out!("  {key}: {value}");
            }
        }
    }
}
