//! A packet capture with tcpdump, for the tests that show what did not
//! cross the TCP/IP stack.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use proxy_redirect::sys::netns::{self, NetNs};

use super::{run, TempDir};

/// tcpdump on an interface of a namespace, written to a file until
/// stopped.
pub struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    pub fn start(netns: &NetNs, interface: &str, dir: &TempDir) -> Capture {
        let file = dir.join(&format!("{interface}.pcap"));
        let mut command = netns::command_in("tcpdump", Some(netns), None).unwrap();
        let mut child = command
            .args([
                "-i",
                interface,
                "-n",
                "-U",
                "--immediate-mode",
                "-s",
                "128",
                "-w",
            ])
            .arg(&file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump (apt-get install tcpdump)");
        // tcpdump creates the file once the capture is open.
        for _ in 0..100 {
            if file.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !file.exists() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tcpdump did not start");
        }
        std::thread::sleep(Duration::from_millis(200));
        Capture { child, file }
    }

    /// Stops the capture; returns (SYN packets, TCP payload bytes, the
    /// packets as text).
    pub fn stop(mut self) -> (usize, u64, String) {
        // Let the last packets reach the file before tcpdump stops.
        std::thread::sleep(Duration::from_millis(500));
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let _ = self.child.wait();
        let mut command = std::process::Command::new("tcpdump");
        command.args(["-n", "-r"]).arg(&self.file);
        let out = run(command);
        let text = String::from_utf8_lossy(&out.stdout);
        let syns = text.lines().filter(|l| l.contains("Flags [S]")).count();
        let payload = text
            .lines()
            .filter_map(|l| l.rsplit("length ").next()?.trim().parse::<u64>().ok())
            .sum();
        (syns, payload, text.into_owned())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
