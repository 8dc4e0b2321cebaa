//! Shared pieces of the integration tests: privilege gating, a private
//! network (client and server namespaces joined by a veth pair), a child
//! cgroup tree, a running `proxy-redirect` process, and small servers.
#![allow(dead_code)]

pub mod capture;
pub mod foreign;
pub mod gateway;
pub mod kernel;
pub mod packet;
pub use proxy_redirect::demo::servers;

use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use proxy_redirect::sys::cgroup::{self, ChildCgroup};
use proxy_redirect::sys::netns::{self, NetNs};

pub const BIN: &str = env!("CARGO_BIN_EXE_proxy-redirect");
pub const PYTHON: &str = "/usr/bin/python3";

/// Ends the test at once when it may not run: without root, outside CI
/// (`have_root` says why).
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::common::have_root() {
            return;
        }
    };
}

/// A `Testbed` once the test may run (see `require_root`).
#[macro_export]
macro_rules! root_testbed {
    () => {
        match $crate::common::have_root() {
            true => $crate::common::Testbed::new(),
            false => return,
        }
    };
}

/// A `gateway::Gateway` once the test may run (see `require_root`).
#[macro_export]
macro_rules! root_gateway {
    () => {
        match $crate::common::have_root() {
            true => $crate::common::gateway::Gateway::new(),
            false => return,
        }
    };
}

/// True when the test may run. Without root it fails under CI=true (CI must
/// never pass by skipping) and skips elsewhere, saying why.
pub fn have_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("this test needs root (BPF, cgroups, network namespaces); CI must run it as root");
    }
    eprintln!("skipped: needs root (BPF, cgroups, network namespaces)");
    false
}

/// True when `what`, a program or module a test needs, is `present`. Missing,
/// it fails under CI=true and skips elsewhere, saying why.
pub fn have(what: &str, present: bool) -> bool {
    if present {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("this test needs {what}; CI must provide it (`make deps` installs it)");
    }
    eprintln!("skipped: needs {what} (`make deps` installs it)");
    false
}

/// True when `program` is an executable file in a directory of $PATH.
pub fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(program))
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    })
}

/// The servers run inside the test process, next to other tests: one that
/// holds a thousand connections must not leave the others without file
/// descriptors (the soft limit is often 1024).
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// A name no other test of this run uses.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub const CLIENT_V4: &str = "10.77.0.1";
pub const SERVER_V4: &str = "10.77.0.2";
pub const CLIENT_V6: &str = "fd77::1";
pub const SERVER_V6: &str = "fd77::2";

/// Client and server namespaces joined by a veth pair, and a cgroup tree
/// `<root>/<unique>/{apps,proxy}`: `apps` is redirected, `proxy` holds the
/// proxy, and the parent answers SO_ORIGINAL_DST for both.
pub struct Testbed {
    // Field order is drop order: cgroups first (their processes are gone).
    pub apps: ChildCgroup,
    pub proxy: ChildCgroup,
    pub parent: ChildCgroup,
    pub client: NetNs,
    pub server: NetNs,
}

impl Testbed {
    pub fn new() -> Testbed {
        raise_open_file_limit();
        let name = unique("prtest");
        let client = NetNs::create(&format!("{name}-c")).expect("client netns");
        let server = NetNs::create(&format!("{name}-s")).expect("server netns");
        netns::veth_pair(&client, "veth-c", &server, "veth-s").expect("veth pair");
        client
            .configure(
                "veth-c",
                &[&format!("{CLIENT_V4}/24"), &format!("{CLIENT_V6}/64")],
            )
            .unwrap();
        server
            .configure(
                "veth-s",
                &[&format!("{SERVER_V4}/24"), &format!("{SERVER_V6}/64")],
            )
            .unwrap();
        let root = cgroup::cgroup2_mount().expect("cgroup2 mount");
        let parent = ChildCgroup::create(&root, &name).expect("test cgroup");
        let apps = ChildCgroup::create(parent.path(), "apps").unwrap();
        let proxy = ChildCgroup::create(parent.path(), "proxy").unwrap();
        Testbed {
            apps,
            proxy,
            parent,
            client,
            server,
        }
    }

    /// `proxy-redirect redirect` for `apps`, answering in the parent,
    /// running in the client netns and the `proxy` cgroup.
    pub fn redirect(&self, extra: &[&str]) -> Running {
        self.redirect_in(&self.proxy, extra)
    }

    pub fn redirect_in(&self, cgroup: &ChildCgroup, extra: &[&str]) -> Running {
        let mut args = vec!["--json"];
        args.extend_from_slice(extra);
        self.redirect_without_events(cgroup, &args)
    }

    /// `redirect` printing no events (as benchmarks run it).
    pub fn redirect_without_events(&self, cgroup: &ChildCgroup, extra: &[&str]) -> Running {
        let mut args = vec![
            "redirect".to_owned(),
            "-c".into(),
            self.apps.path().display().to_string(),
            "--sockopt-cgroup".into(),
            self.parent.path().display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Running::start(BIN, &args, Some(&self.client), Some(cgroup), "Attached")
    }

    /// A command run in the client netns inside `apps`.
    pub fn in_apps(&self, program: &str) -> Command {
        netns::command_in(program, Some(&self.client), Some(&self.apps)).unwrap()
    }

    /// Rejects, in the client netns, `protocol` traffic from `cgroup` to
    /// `port` (IPv4 and IPv6), so that only a redirect can deliver it.
    pub fn reject_direct(
        &self,
        cgroup: &ChildCgroup,
        protocol: &str,
        port: impl std::fmt::Display,
    ) {
        let path = cgroup.relative_path().unwrap();
        for tool in ["iptables", "ip6tables"] {
            let mut command = self.in_client_netns(tool);
            command.args(["-A", "OUTPUT", "-p", protocol, "--dport", &port.to_string()]);
            command.args(["-m", "cgroup", "--path"]).arg(&path);
            command.args(["-j", "REJECT"]);
            let out = run(command);
            assert!(
                out.status.success(),
                "{tool}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// A command run in the client netns inside the `proxy` cgroup.
    pub fn in_proxy_cgroup(&self, program: &str) -> Command {
        netns::command_in(program, Some(&self.client), Some(&self.proxy)).unwrap()
    }

    /// A command run in the client netns outside the test cgroups.
    pub fn in_client_netns(&self, program: &str) -> Command {
        netns::command_in(program, Some(&self.client), None).unwrap()
    }

    pub fn cgroup_paths(&self) -> Vec<PathBuf> {
        vec![
            self.apps.path().to_path_buf(),
            self.parent.path().to_path_buf(),
        ]
    }

    /// Programs of every kind `redirect` attaches, on the test's cgroups.
    pub fn attached_redirect_programs(&self) -> u32 {
        use libbpf_sys::*;
        let mut total = 0;
        for path in self.cgroup_paths() {
            for attach_type in [
                BPF_CGROUP_INET4_CONNECT,
                BPF_CGROUP_INET6_CONNECT,
                BPF_CGROUP_SOCK_OPS,
                BPF_CGROUP_GETSOCKOPT,
                BPF_CGROUP_INET4_GETPEERNAME,
                BPF_CGROUP_INET6_GETPEERNAME,
                BPF_CGROUP_UDP4_SENDMSG,
                BPF_CGROUP_UDP6_SENDMSG,
                BPF_CGROUP_UDP4_RECVMSG,
                BPF_CGROUP_UDP6_RECVMSG,
            ] {
                total +=
                    proxy_redirect::sys::links::cgroup_program_count(&path, attach_type).unwrap();
            }
        }
        total
    }
}

/// The stdout of a command that must have succeeded (`what` names it when
/// it did not).
pub fn stdout_of(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// curl `url`, which must answer.
pub fn curl_ok(command: Command, url: &str) {
    let out = curl(command, url, &[]);
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `body` on a thread in `netns` and returns what it returns.
pub fn in_netns<T: Send + 'static>(
    netns: &NetNs,
    body: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> T {
    netns.spawn(body).unwrap().join().unwrap().unwrap()
}

/// `proxy-redirect ARGS` in `netns` (and `cgroup`), ready once it has
/// attached.
pub fn start_attached(netns: &NetNs, cgroup: Option<&ChildCgroup>, args: &[&str]) -> Running {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    Running::start(BIN, &args, Some(netns), cgroup, "Attached")
}

/// A child process that is killed when the test ends, passed or not.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A service's config file in a directory of its own.
pub struct ConfigFile {
    pub dir: TempDir,
    pub path: PathBuf,
}

impl ConfigFile {
    pub fn new(text: &str) -> ConfigFile {
        let dir = TempDir::new();
        let path = dir.join("config.toml");
        std::fs::write(&path, text).unwrap();
        ConfigFile { dir, path }
    }

    /// Rewrites the file and sends the service SIGHUP.
    pub fn reload(&self, service: &Running, text: &str) {
        std::fs::write(&self.path, text).unwrap();
        service.signal(nix::sys::signal::Signal::SIGHUP);
    }
}

/// One service per host (one status socket): the tests of a file that start
/// services take turns.
static ONE_SERVICE: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn one_service_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_SERVICE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `proxy-redirect run --config FILE` with `extra` options, ready once the
/// service runs. Unless `extra` names a `--pin-dir` (tests/lifecycle.rs
/// gives one on a bpffs of its own), the service pins nothing, wherever
/// the host mounts bpffs: a test that fails leaves no pin behind.
pub fn start_service(
    config: &Path,
    extra: &[&str],
    netns: Option<&NetNs>,
    cgroup: Option<&ChildCgroup>,
) -> Running {
    start_service_of(BIN, config, extra, netns, cgroup)
}

/// `start_service` with another build of the binary (an upgrade's).
pub fn start_service_of(
    program: &str,
    config: &Path,
    extra: &[&str],
    netns: Option<&NetNs>,
    cgroup: Option<&ChildCgroup>,
) -> Running {
    let mut args = vec![
        "run".to_owned(),
        "--config".into(),
        config.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    if !extra.contains(&"--pin-dir") {
        let off_bpffs = std::env::temp_dir().join("proxy-redirect-tests-unpinned/proxy-redirect");
        args.extend(["--pin-dir".to_owned(), off_bpffs.display().to_string()]);
    }
    Running::start(program, &args, netns, cgroup, "Service running")
}

/// Waits until `pipe` has data or its writer closed (true), or until
/// `closed` is set (false).
fn readable_unless(pipe: &impl AsRawFd, closed: &AtomicBool) -> bool {
    let mut poll = libc::pollfd {
        fd: pipe.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        if closed.load(Ordering::Relaxed) {
            return false;
        }
        // SAFETY: one pollfd that lives across the call.
        if unsafe { libc::poll(&mut poll, 1, 100) } != 0 {
            return true;
        }
    }
}

/// A background process whose stdout is collected; ready once a line
/// starting with the ready marker has appeared.
pub struct Running {
    child: Child,
    /// The process a hand-over moved the service to (see `upgrade`); it
    /// writes to the same pipes.
    successor: Option<nix::unistd::Pid>,
    lines: mpsc::Receiver<String>,
    stdout_closed: Arc<AtomicBool>,
    stdout_reader: Option<std::thread::JoinHandle<()>>,
    pub seen: Vec<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Running {
    pub fn start(
        program: &str,
        args: &[String],
        netns: Option<&NetNs>,
        cgroup: Option<&ChildCgroup>,
        ready: &str,
    ) -> Running {
        Running::start_env(program, args, netns, cgroup, ready, &[])
    }

    /// `start` with environment variables `env` set.
    pub fn start_env(
        program: &str,
        args: &[String],
        netns: Option<&NetNs>,
        cgroup: Option<&ChildCgroup>,
        ready: &str,
        env: &[(&str, &str)],
    ) -> Running {
        let mut command = netns::command_in(program, netns, cgroup).unwrap();
        command.envs(env.iter().copied());
        let mut child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {program}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let stdout_closed = Arc::new(AtomicBool::new(false));
        let closed = stdout_closed.clone();
        let stdout_reader = std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            loop {
                if reader.buffer().is_empty() && !readable_unless(reader.get_ref(), &closed) {
                    return;
                }
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let text = line.trim_end_matches(['\n', '\r']).to_owned();
                if tx.send(text).is_err() {
                    return;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let mut running = Running {
            child,
            successor: None,
            lines,
            stdout_closed,
            stdout_reader: Some(stdout_reader),
            seen: Vec::new(),
            stderr,
        };
        running
            .wait_for_line(|l| l.starts_with(ready), Duration::from_secs(120))
            .unwrap_or_else(|| {
                let _ = running.child.kill();
                let (out, err) = running.finish_output();
                panic!("{program} never printed '{ready}'\nstdout:\n{out}\nstderr:\n{err}")
            });
        running
    }

    /// The process that serves: the one started, or its successor.
    pub fn pid(&self) -> u32 {
        match self.successor {
            Some(pid) => pid.as_raw() as u32,
            None => self.child.id(),
        }
    }

    /// SIGUSR2 (`signal`, or another way given as `ask`): the service
    /// starts the binary at its path, which takes over; returns once the
    /// successor serves, and follows it from then on. The process before
    /// it drains and exits on its own.
    pub fn upgrade_with(&mut self, ask: impl FnOnce(u32)) -> u32 {
        // The successor is the service's child: once the service exits it
        // becomes this test process's, to be reaped and asked its status.
        // SAFETY: a plain prctl on this process.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        ask(self.pid());
        let offered = self
            .wait_for_line(
                |l| l.starts_with("Hand-over: pid "),
                Duration::from_secs(60),
            )
            .unwrap_or_else(|| panic!("no successor connected: {:?}", self.seen));
        let pid: i32 = offered["Hand-over: pid ".len()..]
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap();
        self.wait_for_line(
            |l| l.starts_with("Service running"),
            Duration::from_secs(120),
        )
        .unwrap_or_else(|| panic!("the successor never served: {:?}", self.seen));
        self.successor = Some(nix::unistd::Pid::from_raw(pid));
        pid as u32
    }

    pub fn upgrade(&mut self) -> u32 {
        self.upgrade_with(|pid| {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGUSR2,
            );
        })
    }

    /// The exit status of the process this one handed over to, once it
    /// ended (the test process reaps it; see `upgrade`).
    fn wait_successor(pid: nix::unistd::Pid, timeout: Duration) -> std::process::ExitStatus {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        use std::os::unix::process::ExitStatusExt;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => return ExitStatusExt::from_raw(code << 8),
                Ok(WaitStatus::Signaled(_, signal, _)) => {
                    return ExitStatusExt::from_raw(signal as i32)
                }
                Ok(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(_) => {
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                }
                Err(err) => panic!("waiting for the successor {pid}: {err}"),
            }
        }
    }

    /// Reads lines until one matches or the time is up.
    pub fn wait_for_line(
        &mut self,
        matches: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if matches(&line) {
                        return Some(line);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Stops reading stdout, as `| head -1` does once it has its line: the
    /// pipe closes at the next line, and writes after it fail with EPIPE.
    /// Closes the read end of the process's stdout: its next line meets
    /// EPIPE.
    pub fn close_stdout(&mut self) {
        self.stdout_closed.store(true, Ordering::Relaxed);
        if let Some(reader) = self.stdout_reader.take() {
            reader.join().unwrap();
        }
        self.lines = mpsc::channel().1;
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        let _ = nix::sys::signal::kill(pid, signal);
    }

    /// SIGINT, then the exit status, all of stdout and stderr.
    pub fn stop(self) -> (std::process::ExitStatus, String, String) {
        self.stop_with(nix::sys::signal::Signal::SIGINT)
    }

    /// SIGINT, which must end it with success; all of stdout and stderr.
    pub fn stop_ok(self) -> (String, String) {
        let (status, out, err) = self.stop();
        assert!(status.success(), "{status:?}: {err}");
        (out, err)
    }

    /// `signal`, then the exit status, all of stdout and stderr.
    /// After an upgrade: the successor's status; the process it took over
    /// from must have ended by then (it drained), and is reaped.
    pub fn stop_with(
        mut self,
        signal: nix::sys::signal::Signal,
    ) -> (std::process::ExitStatus, String, String) {
        self.signal(signal);
        if self.successor.is_some() && matches!(self.child.try_wait(), Ok(None)) {
            // Still draining: SIGINT cuts it short, leaving the pins to the
            // successor.
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        }
        let status = match self.successor.take() {
            Some(pid) => {
                // The successor is the old process's child until that one
                // exits; only then is it this process's to wait for.
                wait_timeout(&mut self.child, Duration::from_secs(20));
                Running::wait_successor(pid, Duration::from_secs(20))
            }
            None => wait_timeout(&mut self.child, Duration::from_secs(20)),
        };
        let (out, err) = self.finish_output();
        (status, out, err)
    }

    /// Whether it has exited.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits up to `timeout` for it to end by itself (then kills it); the
    /// exit status, all of stdout and stderr.
    pub fn wait(mut self, timeout: Duration) -> (std::process::ExitStatus, String, String) {
        let status = wait_timeout(&mut self.child, timeout);
        let (out, err) = self.finish_output();
        (status, out, err)
    }

    /// SIGKILL and wait.
    pub fn kill(mut self) {
        let successor = self.successor.take();
        if let Some(pid) = successor {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(pid) = successor {
            Running::wait_successor(pid, Duration::from_secs(20));
        }
    }

    fn finish_output(&mut self) -> (String, String) {
        let _ = self.child.wait();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(line);
        }
        let stderr = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new));
        (self.seen.join("\n"), stderr.join().unwrap_or_default())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let successor = self.successor.take();
        if let Some(pid) = successor {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(pid) = successor {
            let _ = nix::sys::wait::waitpid(pid, None);
        }
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Lets the sidecars of original_dst.py, each waiting for the file `go`,
/// start their clients at once, and checks that each reports "ok COUNT".
pub fn release_sidecars(go: &str, sidecars: Vec<Running>, count: &str, what: &str) {
    std::fs::write(go, "").unwrap();
    for mut sidecar in sidecars {
        let line = sidecar.wait_for_line(
            |l| l.starts_with("ok") || l == "failed",
            Duration::from_secs(120),
        );
        assert_eq!(
            line.as_deref(),
            Some(format!("ok {count}").as_str()),
            "{what}: {}",
            sidecar.seen.join("\n")
        );
    }
}

const ORIGINAL_DST: &str = include_str!("original_dst.py");

/// original_dst.py (SO_ORIGINAL_DST sidecars, proxies and clients) with
/// `args`, as argv for `python3`.
pub fn original_dst_args(args: &[&str]) -> Vec<String> {
    ["-c", ORIGINAL_DST]
        .iter()
        .chain(args)
        .map(|s| s.to_string())
        .collect()
}

/// dnsmasq in the server netns on SERVER_V4:`port`, answering 10.77.0.99
/// for every name under example.test; returned once it listens.
pub fn start_dnsmasq(testbed: &Testbed, port: u16) -> Running {
    // dnsmasq logs to stderr only; its "started" line says it listens.
    let script = format!(
        "exec dnsmasq --conf-file=/dev/null --no-resolv --no-hosts \
         --address=/example.test/10.77.0.99 --listen-address={SERVER_V4} --port={port} \
         --bind-interfaces --pid-file= --log-facility=- -k 2>&1"
    );
    Running::start(
        "sh",
        &["-c".to_owned(), script],
        Some(&testbed.server),
        None,
        "dnsmasq[",
    )
}

/// Runs a command to the end, with a time limit.
pub fn run(mut command: Command) -> Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning a test command");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(output) => output.expect("collecting output"),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("command timed out: {command:?}");
        }
    }
}

/// Waits until no TCP connection in `netns` is opening, open or half-closed
/// (what is left is in TIME_WAIT or FIN_WAIT2 after its close): the relays
/// have finished and every socket has passed TCP_CLOSE. Slow machines, and
/// `make vm-test` under emulation, need far longer than a fixed pause.
pub fn wait_for_tcp_to_settle(netns: &NetNs) {
    let busy = [
        "syn-sent",
        "syn-recv",
        "established",
        "fin-wait-1",
        "close-wait",
        "last-ack",
        "closing",
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let mut command = netns::command_in("ss", Some(netns), None).unwrap();
        command.arg("-Htn");
        for state in busy {
            command.args(["state", state]);
        }
        let out = run(command);
        assert!(
            out.status.success(),
            "ss: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if out.stdout.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "TCP connections still open after 120 s:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// JSON event lines of a `--json` run.
pub fn json_events(output: &str) -> Vec<serde_json::Value> {
    output
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("valid JSON event"))
        .filter(|record| record.get("statistics").is_none())
        .collect()
}

/// The counter `name` of `datapath` in the JSON summary that `--json` runs
/// print at exit.
pub fn summary_value(output: &str, datapath: &str, name: &str) -> u64 {
    let summary: serde_json::Value = output
        .lines()
        .rev()
        .find(|l| l.starts_with("{\"statistics\""))
        .map(|l| serde_json::from_str(l).expect("valid JSON summary"))
        .unwrap_or_else(|| panic!("no JSON summary in:\n{output}"));
    summary["statistics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["datapath"] == datapath)
        .and_then(|s| s[name].as_u64())
        .unwrap_or_else(|| panic!("no {datapath} {name} in {summary}"))
}

/// The number in a `  label:   N` line of the human-readable statistics:
/// for the tests that check that text itself, and for runs without `--json`.
pub fn stat(output: &str, label: &str) -> u64 {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|rest| rest.trim_start_matches(':').trim().parse().ok())
        .unwrap_or_else(|| panic!("no '{label}' line in:\n{output}"))
}

/// A deterministic pseudo-random payload.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u8
        })
        .collect()
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let dir = std::env::temp_dir().join(unique("proxy-redirect-test"));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// curl with the options every test uses; `command` is curl already placed
/// in its namespace (and cgroup).
pub fn curl(mut command: Command, url: &str, extra: &[&str]) -> Output {
    command
        .args(["-sS", "--fail", "--max-time", "20", "-H", "Expect:"])
        .args(extra)
        .arg(url);
    run(command)
}

/// POSTs `data` to an echo endpoint with curl (made by `new_curl`) and
/// checks that exactly the same bytes come back.
pub fn assert_http_echo(new_curl: impl Fn() -> Command, url: &str, data: &[u8]) {
    let dir = TempDir::new();
    let (upload, download) = (dir.join("upload"), dir.join("download"));
    std::fs::write(&upload, data).unwrap();
    let upload_arg = format!("@{}", upload.display());
    let download_arg = download.display().to_string();
    let out = curl(
        new_curl(),
        url,
        &["--data-binary", &upload_arg, "-o", &download_arg],
    );
    assert!(
        out.status.success(),
        "{url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let echoed = std::fs::read(&download).unwrap();
    assert!(
        echoed == data,
        "{url}: {} bytes came back, not the {} sent",
        echoed.len(),
        data.len()
    );
}

/// Runs a python script (`command` is python already placed in its
/// namespace and cgroup); it must succeed. Returns its stdout.
pub fn python(mut command: Command, script: &str) -> String {
    command.args(["-c", script]);
    let out = run(command);
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A run that must fail with exactly one line on stderr containing
/// `expected`; `what` names the case in assertion messages.
pub fn assert_one_line_error(out: &Output, what: &str, expected: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what} succeeded");
    assert_eq!(stderr.trim().lines().count(), 1, "{what}: {stderr}");
    assert!(
        stderr.contains(expected),
        "{what}: '{stderr}' lacks '{expected}'"
    );
}

/// The binary run as user nobody, which must refuse with one line saying
/// it needs root. (Not in a netns: joining one needs the privileges it
/// lacks, and the check comes before anything is touched.)
pub fn assert_refused_without_privileges(args: &[&str]) {
    let bin = BinForOthers::new();
    let mut command = Command::new(&bin.path);
    command.args(args);
    std::os::unix::process::CommandExt::uid(&mut command, 65534);
    assert_one_line_error(&run(command), "running as nobody", "needs root");
}

/// promtool from Debian's prometheus package, unpacked by `make test`.
const PROMTOOL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/target/prometheus/usr/bin/promtool"
);

/// `GET http://ADDR/metrics` from inside `netns`, after the page has been
/// refreshed (once a second) since whatever the test just did.
pub fn scrape_metrics(netns: &NetNs, addr: &str) -> String {
    std::thread::sleep(Duration::from_millis(1500));
    let command = netns::command_in("curl", Some(netns), None).unwrap();
    let out = curl(command, &format!("http://{addr}/metrics"), &[]);
    assert!(
        out.status.success(),
        "scraping {addr}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The value of the sample `name` (with its labels, if any) on a page.
pub fn metric_value(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in:\n{page}"))
        .parse()
        .unwrap()
}

/// Scrapes until the sample `name` reaches `at_least`, for up to 60 s (an
/// emulated kernel can take seconds over a reload); the last page.
pub fn scrape_until(netns: &NetNs, addr: &str, name: &str, at_least: u64) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let page = scrape_metrics(netns, addr);
        if metric_value(&page, name) >= at_least || std::time::Instant::now() > deadline {
            return page;
        }
    }
}

/// `promtool check metrics` must accept the page.
pub fn assert_promtool_accepts(page: &str) {
    use std::io::Write;
    assert!(
        std::path::Path::new(PROMTOOL).exists(),
        "{PROMTOOL} is missing: run `make test`, which unpacks it"
    );
    let mut child = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let checked = child.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool: {}{}\n{page}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

/// `redirect`'s exit statistics (of a `--json` run): no published record
/// outlives its connection. (An answer lives in the proxy socket's own
/// storage and goes with it.)
pub fn assert_maps_empty(output: &str) {
    assert_eq!(
        summary_value(output, "redirect", "awaiting_accept"),
        0,
        "{output}"
    );
}

/// The binary where other users can run it: the build tree may sit in a
/// directory only root may enter (a checkout under `mktemp -d`), so a copy
/// in a temporary directory of its own, removed on drop.
pub struct BinForOthers {
    pub path: String,
    _dir: TempDir,
}

impl BinForOthers {
    pub fn new() -> BinForOthers {
        let dir = TempDir::new();
        let path = dir.join("proxy-redirect");
        // Copied by cp, not std::fs::copy: a process another test thread
        // forks meanwhile would inherit our descriptor open for writing, and
        // executing the copy would fail with ETXTBSY ("Text file busy").
        let copied = Command::new("cp")
            .arg(BIN)
            .arg(&path)
            .status()
            .expect("running cp");
        assert!(copied.success(), "copying the binary");
        BinForOthers {
            path: path.display().to_string(),
            _dir: dir,
        }
    }
}

/// The TCPFastOpenPassive counter of a namespace: connections whose SYN
/// carried data that the server accepted.
pub fn fast_open_passive(netns: &NetNs) -> u64 {
    let mut command = netns::command_in("cat", Some(netns), None).unwrap();
    command.arg("/proc/net/netstat");
    let out = run(command);
    assert!(out.status.success(), "reading /proc/net/netstat");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "TCPFastOpenPassive")
        .map(|(_, value)| value.parse().unwrap())
        .expect("TCPFastOpenPassive counter")
}

/// tcx programs, ingress and egress, on a device of `netns`.
pub fn tcx_programs(netns: &NetNs, device: &str) -> u32 {
    use proxy_redirect::sys::links::{tcx_program_count, TcDirection};
    let device = device.to_owned();
    netns
        .spawn(move || {
            let ifindex = nix::net::if_::if_nametoindex(device.as_str())?;
            Ok(tcx_program_count(ifindex, TcDirection::Ingress)?
                + tcx_program_count(ifindex, TcDirection::Egress)?)
        })
        .unwrap()
        .join()
        .unwrap()
        .unwrap()
}

/// TC programs on a device of `netns`: tcx links, or on kernels before 6.6
/// the filters of the clsact fallback.
pub fn tc_programs(netns: &NetNs, device: &str) -> u32 {
    if !kernel::has_tcx() {
        let mut total = 0;
        for direction in ["ingress", "egress"] {
            let mut command = netns::command_in("tc", Some(netns), None).unwrap();
            command.args(["filter", "show", "dev", device, direction]);
            let out = String::from_utf8(run(command).stdout).unwrap();
            let filters = out
                .lines()
                .filter(|l| l.contains(" bpf ") && l.contains(" handle "));
            total += filters.count() as u32;
        }
        return total;
    }
    tcx_programs(netns, device)
}

/// `unshare` with the arguments that run, in a network namespace of its
/// own (and a user namespace too with `-Urn`), a listener on the proxy
/// address that never accepts and `count` connections to 10.99.0.1:80 left
/// half-open: each SYN keeps its redirect record while the kernel retries
/// it. It prints "holding" once they are made, then waits `seconds`.
pub fn half_open_holder(namespaces: &str, count: usize, seconds: u32) -> Vec<String> {
    let script = format!(
        r#"
import resource, socket, subprocess, time
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, {count} + 100),) * 2)
except (ValueError, OSError):
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
subprocess.run("ip link set lo up && ip addr add 10.99.0.1/32 dev lo", shell=True, check=True)
listener = socket.socket()
listener.bind(("127.0.0.1", 15001))
listener.listen(1)
sockets = []
for i in range({count}):
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect(("10.99.0.1", 80))
    except BlockingIOError:
        pass
    sockets.append(s)
print("holding", flush=True)
time.sleep({seconds})
"#
    );
    ["unshare", namespaces, "--", PYTHON, "-c", &script]
        .map(String::from)
        .to_vec()
}

/// Starts `command` and waits for the first word it prints; panics with its
/// stderr, naming it `what`, when it exits first.
pub fn spawn_until_it_speaks(mut command: Command, what: &str) -> Child {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 1];
    if child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .is_err()
    {
        let out = child.wait_with_output().unwrap();
        panic!("{what}: {}", String::from_utf8_lossy(&out.stderr));
    }
    child
}

/// The entries of the map `name` (as the kernel shortens it, to 15
/// characters) that process `pid` holds, through bpftool.
pub fn map_entries(pid: u32, name: &str) -> Vec<serde_json::Value> {
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
    {
        let info = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let Some(id) = info.lines().find_map(|l| l.strip_prefix("map_id:")) else {
            continue;
        };
        let show = std::process::Command::new("bpftool")
            .args(["-j", "map", "show", "id", id.trim()])
            .output()
            .unwrap();
        let shown: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap_or_default();
        if shown["name"] != name {
            continue;
        }
        let dump = std::process::Command::new("bpftool")
            .args(["-j", "map", "dump", "id", id.trim()])
            .output()
            .unwrap();
        return serde_json::from_slice(&dump.stdout).unwrap();
    }
    panic!("process {pid} holds no map {name}");
}
