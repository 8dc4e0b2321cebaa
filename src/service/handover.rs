//! The hand-over of a running service to its successor, the way Envoy's
//! hot restart and HAProxy's seamless reload do it: the successor takes the
//! listening sockets themselves, accept queues and all, so no connection is
//! refused or sent around the proxy; the service that leaves stops
//! accepting and drains the connections it relays, for at most
//! `--drain-timeout`; the kernel's datapaths stay attached throughout
//! (the successor adopts the pinned maps and swaps its programs into the
//! pinned links).
//!
//! The two processes talk over RUN_DIR/handover.sock (root only), in five
//! steps:
//! 1. successor: `hello`;
//! 2. service: `offer`, with duplicates of its listening sockets, locks
//!    and metrics socket; it goes on serving;
//! 3. successor, once prepared (programs loaded, sockets taken): `commit`,
//!    naming what it took;
//! 4. service: stops accepting, pauses the UDP relay, and answers
//!    `released` with the UDP flows (upstream sockets included);
//! 5. successor, once attached and relaying: `serving`. The service tells
//!    systemd the successor's pid, lets go of its sockets, drains, and
//!    ends with `drained`.
//!
//! A successor that goes away before step 5 leaves the service as it was:
//! after step 4 the service puts its own programs back into the links
//! (the successor may have swapped some of its own in) and accepts and
//! relays again.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::runtime::{RunContext, RunningDatapath};
use crate::sys::handover::{Bequest, Channel, Handed, Listener, MAX_FDS};
use crate::sys::notify;
use crate::sys::run_dir::{self, RUN_DIR};
use crate::telemetry::metrics::Metrics;
use crate::{err_out, out};

const SOCKET_NAME: &str = "handover.sock";
/// How long a successor may take to prepare (load its programs) once it
/// was offered the sockets; an emulated machine needs tens of seconds.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one step may take once the other side is ready for it.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

fn socket_path() -> PathBuf {
    Path::new(RUN_DIR).join(SOCKET_NAME)
}

/// A running service's side: where successors find it, and the one
/// hand-over in progress.
pub struct Service {
    listener: Listener,
    /// The binary this process was started from, as its path read at
    /// start: an upgrade replaces the file there.
    exe: Option<PathBuf>,
    /// A successor started by SIGUSR2 that has not taken over yet.
    spawned: Option<Child>,
    /// A successor that connected and was offered the sockets.
    offered: Option<Offered>,
    /// Hand-overs that failed, and why the last one did (for `status`
    /// and `upgrade`).
    failures: u64,
    last_failure: Option<String>,
}

struct Offered {
    channel: Channel,
    pid: u32,
    since: Instant,
}

/// What a successor that serves now took: the service drains and ends.
pub struct HandedOver {
    channel: Channel,
    pub pid: u32,
    taken: Vec<String>,
    /// The datapaths the successor runs.
    datapaths: Vec<String>,
}

impl Service {
    /// Listens for successors (`run --take-over`) at RUN_DIR/handover.sock;
    /// `beside`: at a name of its own, until `take_place` (a successor
    /// that does not serve yet).
    pub fn listen(beside: bool) -> Result<Service> {
        let dir = run_dir::create()?;
        let path = match beside {
            true => dir.join(format!("{SOCKET_NAME}.{}", std::process::id())),
            false => dir.join(SOCKET_NAME),
        };
        Ok(Service {
            listener: Listener::bind(&path)?,
            exe: std::env::current_exe().ok(),
            spawned: None,
            offered: None,
            failures: 0,
            last_failure: None,
        })
    }

    /// Says why a hand-over failed, in one line, and keeps it for `status`.
    fn fail(&mut self, why: String) {
        err_out!("{why}; this service goes on");
        self.failures += 1;
        self.last_failure = Some(why);
    }

    /// For the status page: `upgrade` tells from it whether the hand-over
    /// it asked for failed, and why.
    pub fn status(&self) -> Value {
        json!({
            "in_progress": self.spawned.is_some() || self.offered.is_some(),
            "failures": self.failures,
            "last_failure": self.last_failure,
        })
    }

    /// Moves the socket over the one of the service taken over.
    pub fn take_place(&mut self) -> Result<()> {
        self.listener.rename(&socket_path())
    }

    /// SIGUSR2: starts the binary now on disk with this process's
    /// arguments and `--take-over`; it connects back, and `poll` hands
    /// over to it.
    pub fn spawn_successor(&mut self) {
        if self.spawned.is_some() || self.offered.is_some() {
            err_out!("An upgrade is already in progress; SIGUSR2 ignored");
            return;
        }
        let Some(exe) = self.exe.clone() else {
            self.fail("Cannot upgrade: the path of this binary is unknown".into());
            return;
        };
        let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        if !args.iter().any(|a| a == "--take-over") {
            args.push("--take-over".into());
        }
        match Command::new(&exe).args(&args).spawn() {
            Ok(child) => {
                out!(
                    "Upgrading: started {} (pid {}) to take over",
                    exe.display(),
                    child.id()
                );
                self.spawned = Some(child);
            }
            Err(err) => self.fail(format!("Cannot upgrade: starting {}: {err}", exe.display())),
        }
    }

    /// Called every tick: offers the sockets to a successor that
    /// connected, and completes the hand-over once it commits; Some when
    /// the successor serves.
    pub fn poll<R: RunningDatapath>(
        &mut self,
        datapaths: &mut [R],
        metrics: &Metrics,
    ) -> Option<HandedOver> {
        self.reap_successor();
        if self.offered.is_none() {
            match self.listener.accept() {
                Ok(Some(channel)) => match offer(&channel, datapaths, metrics) {
                    Ok(pid) => {
                        self.offered = Some(Offered {
                            channel,
                            pid,
                            since: Instant::now(),
                        })
                    }
                    Err(err) => self.fail(format!("A hand-over did not start: {err:#}")),
                },
                Ok(None) => {}
                Err(err) => tracing::warn!("{err:#}"),
            }
            return None;
        }
        let offered = self.offered.as_ref()?;
        match offered.channel.wait_readable(Duration::ZERO) {
            Ok(false) if offered.since.elapsed() < PREPARE_TIMEOUT => return None,
            Ok(false) => {
                let why = format!(
                    "The successor (pid {}) did not commit within {} s",
                    offered.pid,
                    PREPARE_TIMEOUT.as_secs()
                );
                self.offered = None;
                self.fail(why);
                return None;
            }
            Ok(true) => {}
            Err(err) => tracing::warn!("{err:#}"),
        }
        let Offered { channel, pid, .. } = self.offered.take()?;
        match complete(&channel, datapaths) {
            Ok(Some((taken, names))) => {
                if let Some(mut child) = self.spawned.take() {
                    // Reaped by whoever adopts it once this process ends.
                    let _ = child.try_wait();
                }
                Some(HandedOver {
                    channel,
                    pid,
                    taken,
                    datapaths: names,
                })
            }
            Ok(None) => {
                self.fail(format!(
                    "The successor (pid {pid}) went away before taking over"
                ));
                None
            }
            Err(err) => {
                self.fail(format!("The hand-over to pid {pid} failed: {err:#}"));
                for datapath in datapaths.iter_mut() {
                    let datapath = datapath.datapath_mut();
                    if let Err(err) = datapath.reclaim() {
                        err_out!("Taking back the links of {}: {err:#}", datapath.name());
                    }
                    for relay in datapath.relays() {
                        if let Err(err) = relay.resume() {
                            err_out!("Resuming a relay: {err:#}");
                        }
                    }
                }
                None
            }
        }
    }

    /// Says so when a successor this process started ended without taking
    /// over (a configuration it refuses, a binary that fails).
    fn reap_successor(&mut self) {
        let Some(child) = &mut self.spawned else {
            return;
        };
        if let Ok(Some(status)) = child.try_wait() {
            let why = format!(
                "The successor (pid {}) exited ({status}) without taking over",
                child.id()
            );
            self.spawned = None;
            self.offered = None;
            self.fail(why);
        }
    }
}

/// Step 2: the sockets of every relay and datapath, and the metrics
/// socket, offered as duplicates; returns the successor's pid.
fn offer<R: RunningDatapath>(
    channel: &Channel,
    datapaths: &mut [R],
    metrics: &Metrics,
) -> Result<u32> {
    let (hello, _) = channel.recv(STEP_TIMEOUT)?;
    let hello: Value = serde_json::from_str(&hello).context("a hello that is not JSON")?;
    let pid = hello["hello"]["pid"]
        .as_u64()
        .context("a hello without the successor's pid")? as u32;
    let mut bequest = Bequest::default();
    for datapath in datapaths.iter_mut() {
        datapath.datapath().bequeath(&mut bequest)?;
        for relay in datapath.datapath_mut().relays() {
            relay.bequeath(&mut bequest)?;
        }
    }
    metrics.bequeath(&mut bequest)?;
    out!(
        "Hand-over: pid {pid} asked to take over; offered {} socket(s)",
        bequest.items.len()
    );
    send_items(channel, "offer", bequest.items)?;
    Ok(pid)
}

/// Steps 3 to 5: on the successor's commit, stop taking new work and
/// hand the UDP flows over; then wait until it serves. Ok(None) when it
/// went away before committing; else what it took and the datapaths it
/// runs.
fn complete<R: RunningDatapath>(
    channel: &Channel,
    datapaths: &mut [R],
) -> Result<Option<(Vec<String>, Vec<String>)>> {
    let Ok((commit, _)) = channel.recv(Duration::ZERO) else {
        return Ok(None);
    };
    let commit: Value = serde_json::from_str(&commit).context("a commit that is not JSON")?;
    let taken: Vec<String> = serde_json::from_value(commit["commit"]["taken"].clone())
        .context("a commit without what it took")?;
    let mut bequest = Bequest::default();
    for datapath in datapaths.iter_mut() {
        for relay in datapath.datapath_mut().relays() {
            relay.release(&mut bequest)?;
        }
    }
    send_items(channel, "released", bequest.items)?;
    let (serving, _) = channel.recv(STEP_TIMEOUT)?;
    let serving: Value = serde_json::from_str(&serving).context("not JSON")?;
    let Some(pid) = serving["serving"]["pid"].as_u64() else {
        bail!("the successor said {serving} instead of serving");
    };
    let names: Vec<String> = serde_json::from_value(serving["serving"]["datapaths"].clone())
        .context("a successor that does not say what it runs")?;
    // Before the successor says READY=1, so that systemd hears it from
    // the main process.
    notify::notify(&format!("MAINPID={pid}"));
    channel.send(&json!({"retiring": {}}).to_string(), &[])?;
    Ok(Some((taken, names)))
}

impl HandedOver {
    /// Lets go of the listening sockets (serving what already waits on
    /// those the successor did not take), and detaches the datapaths the
    /// successor does not run.
    pub fn retire<R: RunningDatapath>(&self, datapaths: &mut [R]) -> u64 {
        let mut open = 0;
        for datapath in datapaths.iter_mut() {
            let name = datapath.datapath().name();
            if !self.datapaths.contains(&name) {
                datapath.datapath_mut().detach();
                out!("Detached {name}, which the new configuration does not have");
            }
            for relay in datapath.datapath_mut().relays() {
                relay.retire(&self.taken);
                open += relay.open_connections();
            }
        }
        open
    }

    /// Waits until the connections this process relays have ended, or the
    /// deadline (then resets them), or a stop; tells the successor.
    pub fn drain<R: RunningDatapath>(
        &self,
        datapaths: &mut [R],
        timeout: Duration,
        stop_requested: impl Fn() -> bool,
    ) {
        let open = |datapaths: &mut [R]| -> u64 {
            datapaths
                .iter_mut()
                .flat_map(|d| d.datapath_mut().relays())
                .map(|relay| relay.open_connections())
                .sum()
        };
        let at_start = open(datapaths);
        out!(
            "Handed over to pid {}: draining {at_start} connection(s) for at most {} s",
            self.pid,
            timeout.as_secs()
        );
        let deadline = Instant::now() + timeout;
        while open(datapaths) > 0 && Instant::now() < deadline && !stop_requested() {
            std::thread::sleep(Duration::from_millis(50));
        }
        let cut = open(datapaths);
        if cut > 0 {
            for datapath in datapaths.iter_mut() {
                for relay in datapath.datapath_mut().relays() {
                    relay.cut();
                }
            }
            let settle = Instant::now() + Duration::from_secs(1);
            while open(datapaths) > 0 && Instant::now() < settle {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let finished = at_start.saturating_sub(cut);
        out!("Drained: {finished} connection(s) ended, {cut} cut");
        let report = json!({"drained": {"finished": finished, "cut": cut}});
        if let Err(err) = self.channel.send(&report.to_string(), &[]) {
            tracing::debug!("telling the successor of the drain: {err:#}");
        }
    }
}

/// A successor's side: the service it takes over from.
pub struct Predecessor {
    channel: Channel,
    pub pid: u32,
    /// Once it said how its drain went.
    drained: Option<(u64, u64)>,
}

impl Predecessor {
    /// Connects to the running service, if any, and takes its offer into
    /// `ctx.inheritance`.
    pub fn find(ctx: &mut RunContext) -> Result<Option<Predecessor>> {
        let Some(channel) = Channel::connect(&socket_path())? else {
            return Ok(None);
        };
        let hello =
            json!({"hello": {"pid": std::process::id(), "version": env!("CARGO_PKG_VERSION")}});
        channel.send(&hello.to_string(), &[])?;
        let (kind, pid, items) = recv_items(&channel, STEP_TIMEOUT)
            .context("the running service did not offer its sockets")?;
        if kind != "offer" {
            bail!("the running service answered {kind} instead of an offer");
        }
        out!(
            "Taking over from pid {pid}: {} socket(s) offered",
            items.len()
        );
        ctx.inheritance = crate::sys::handover::Inheritance::new(items);
        Ok(Some(Predecessor {
            channel,
            pid,
            drained: None,
        }))
    }

    /// Step 3: everything is prepared; the predecessor stops taking new
    /// work and hands its UDP flows over (into `ctx.inheritance`).
    pub fn commit(&self, ctx: &RunContext) -> Result<()> {
        let taken = ctx.inheritance.taken();
        let commit = json!({"commit": {"taken": taken}});
        self.channel.send(&commit.to_string(), &[])?;
        let (kind, _, items) = recv_items(&self.channel, STEP_TIMEOUT)?;
        if kind != "released" {
            bail!("the running service answered {kind} instead of releasing");
        }
        let flows = items.len();
        ctx.inheritance.extend(items);
        out!(
            "Took over {} socket(s) and {flows} UDP flow(s) from pid {}",
            taken.len(),
            self.pid
        );
        Ok(())
    }

    /// Step 5: this process serves `datapaths`; the predecessor drains
    /// once it has told systemd that this is the main process.
    pub fn serving(&self, datapaths: &[String]) -> Result<()> {
        let serving = json!({"serving": {"pid": std::process::id(), "datapaths": datapaths}});
        self.channel.send(&serving.to_string(), &[])?;
        if let Err(err) = self.channel.recv(STEP_TIMEOUT) {
            err_out!(
                "warning: the predecessor (pid {}) did not answer: {err:#}",
                self.pid
            );
        }
        Ok(())
    }

    /// How the predecessor's drain went, once it said: (connections that
    /// ended, connections cut at its deadline).
    pub fn poll_drained(&mut self) -> Option<(u64, u64)> {
        if self.drained.is_none() && self.channel.wait_readable(Duration::ZERO).unwrap_or(false) {
            let report = self.channel.recv(Duration::ZERO).ok();
            let report: Option<Value> =
                report.and_then(|(text, _)| serde_json::from_str(&text).ok());
            let drained = report.as_ref().map(|r| &r["drained"]);
            let finished = drained.and_then(|d| d["finished"].as_u64()).unwrap_or(0);
            let cut = drained.and_then(|d| d["cut"].as_u64()).unwrap_or(0);
            out!(
                "The predecessor (pid {}) drained {finished} connection(s), {cut} cut, and let go",
                self.pid
            );
            self.drained = Some((finished, cut));
        }
        self.drained
    }
}

/// Sends `items` as messages of at most MAX_FDS descriptors each, the
/// first saying `kind` and this process's pid.
fn send_items(channel: &Channel, kind: &str, items: Vec<Handed>) -> Result<()> {
    let batches: Vec<&[Handed]> = match items.is_empty() {
        true => vec![&[]],
        false => items.chunks(MAX_FDS).collect(),
    };
    let count = batches.len();
    for (index, batch) in batches.into_iter().enumerate() {
        let described: Vec<Value> = batch
            .iter()
            .map(|item| json!({"role": item.role, "detail": item.detail}))
            .collect();
        let message = json!({
            "kind": kind,
            "pid": std::process::id(),
            "items": described,
            "more": index + 1 < count,
        });
        let fds: Vec<_> = batch.iter().map(|item| item.fd.as_fd()).collect();
        channel.send(&message.to_string(), &fds)?;
    }
    Ok(())
}

/// The items of one `send_items`: (kind, the sender's pid, items).
fn recv_items(channel: &Channel, timeout: Duration) -> Result<(String, u32, Vec<Handed>)> {
    let mut items = Vec::new();
    loop {
        let (text, fds) = channel.recv(timeout)?;
        let message: Value = serde_json::from_str(&text).context("a message that is not JSON")?;
        let described = message["items"].as_array().cloned().unwrap_or_default();
        if described.len() != fds.len() {
            bail!(
                "{} items came with {} descriptors",
                described.len(),
                fds.len()
            );
        }
        for (item, fd) in described.into_iter().zip(fds) {
            items.push(Handed {
                role: item["role"].as_str().unwrap_or_default().to_owned(),
                detail: item["detail"].clone(),
                fd,
            });
        }
        if !message["more"].as_bool().unwrap_or(false) {
            let kind = message["kind"].as_str().unwrap_or_default().to_owned();
            let pid = message["pid"].as_u64().unwrap_or(0) as u32;
            return Ok((kind, pid, items));
        }
    }
}
