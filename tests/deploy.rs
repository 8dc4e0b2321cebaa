//! deploy/: the systemd unit passes `systemd-analyze verify`, every datapath
//! runs with only the capabilities the unit grants, and the Kubernetes
//! manifest is valid YAML that grants the same and carries a config the
//! service accepts.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::gateway;
use common::*;

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/proxy-redirect.service");
const DAEMONSET: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/kubernetes/daemonset.yaml"
);

/// The value of `Key=` in the unit (the first such line).
fn unit_setting(key: &str) -> String {
    let text = std::fs::read_to_string(UNIT).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {UNIT}"))
        .to_owned()
}

/// `CapabilityBoundingSet=`: ["CAP_BPF", ...].
fn unit_capabilities() -> Vec<String> {
    let mut caps: Vec<String> = unit_setting("CapabilityBoundingSet")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    caps.sort();
    caps
}

/// `systemd-analyze verify UNIT` where the unit's ExecStart binary exists:
/// in a private mount namespace, a tmpfs over its directory holds a link to
/// the binary under test. Nothing outside the namespace changes.
fn verify(unit: &Path) -> Output {
    let exec_start = unit_setting("ExecStart");
    let binary = Path::new(exec_start.split_whitespace().next().unwrap());
    let script = format!(
        "mount -t tmpfs tmpfs {dir} && ln -s {BIN} {binary} && exec systemd-analyze verify {unit}",
        dir = binary.parent().unwrap().display(),
        binary = binary.display(),
        unit = unit.display(),
    );
    let mut command = Command::new("unshare");
    command.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    run(command)
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    if !have_root()
        || !have(
            "systemd-analyze (package systemd)",
            on_path("systemd-analyze"),
        )
    {
        return;
    }
    let out = verify(Path::new(UNIT));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "systemd-analyze verify: {said}");
    assert_eq!(said, "", "systemd-analyze verify has warnings");

    // The same check sees a setting systemd does not know (it only warns).
    let dir = TempDir::new();
    let broken = dir.join("proxy-redirect.service");
    let text = std::fs::read_to_string(UNIT).unwrap();
    std::fs::write(
        &broken,
        text.replace("[Service]\n", "[Service]\nNoSuchSetting=1\n"),
    )
    .unwrap();
    let out = verify(&broken);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unknown key 'NoSuchSetting'"),
        "{out:?}"
    );
}

/// setpriv arguments that run `proxy-redirect ARGS` as root with only
/// `caps`: the bounding set limits what root gets at exec, as systemd's
/// CapabilityBoundingSet= does.
fn with_capabilities(caps: &[String], args: &[&str]) -> Vec<String> {
    let set: Vec<String> = caps
        .iter()
        .map(|cap| format!("+{}", cap.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let mut full: Vec<String> = vec![
        "--bounding-set".into(),
        format!("-all,{}", set.join(",")),
        "--inh-caps".into(),
        "-all".into(),
        "--no-new-privs".into(),
        BIN.into(),
    ];
    full.extend(args.iter().map(|arg| arg.to_string()));
    full
}

fn stop_cleanly(running: Running, datapath: &str) -> String {
    let (status, output, stderr) = running.stop();
    assert!(status.success(), "{datapath}: {stderr}");
    assert!(output.contains("Cleaned up"), "{datapath}: {output}");
    output
}

#[test]
fn every_datapath_runs_with_only_the_units_capabilities() {
    require_root!();
    let caps = unit_capabilities();
    let testbed = Testbed::new();
    let _web = servers::http(&testbed.server, "[::]:80").unwrap();

    // redirect, with the built-in proxy (SO_MARK on every upstream connection).
    let apps = testbed.apps.path().display().to_string();
    let parent = testbed.parent.path().display().to_string();
    let args = ["redirect", "-c", &apps, "--sockopt-cgroup", &parent];
    let redirect = Running::start(
        "setpriv",
        &with_capabilities(&caps, &args),
        Some(&testbed.client),
        Some(&testbed.proxy),
        "Attached",
    );
    let data = payload(1 << 20, 3);
    assert_http_echo(
        || testbed.in_apps("curl"),
        &format!("http://{SERVER_V4}/"),
        &data,
    );
    let output = stop_cleanly(redirect, "redirect");
    assert_eq!(stat(&output, "relayed to the end"), 1, "{output}");

    // bypass: one same-host connection in the cgroup takes the bypass.
    let args = ["bypass", "-c", &apps];
    let bypass = Running::start(
        "setpriv",
        &with_capabilities(&caps, &args),
        Some(&testbed.client),
        None,
        "Attached",
    );
    let mut peers = testbed.in_apps(PYTHON);
    peers.args(["-c", include_str!("common/peers.py")]);
    peers.args(["echo", "127.0.0.1", "127.0.0.1", "65536", "1"]);
    let out = run(peers);
    assert!(out.status.success(), "{out:?}");
    let output = stop_cleanly(bypass, "bypass");
    assert_eq!(stat(&output, "inserted"), 2, "{output}");

    // port-nat: 8080, where nothing listens, reaches the server's 80.
    let url = format!("http://{SERVER_V4}:8080/");
    assert!(!curl(testbed.in_client_netns("curl"), &url, &[])
        .status
        .success());
    let args = ["port-nat", "-i", "veth-s", "-f", "8080", "-t", "80"];
    let port_nat = Running::start(
        "setpriv",
        &with_capabilities(&caps, &args),
        Some(&testbed.server),
        None,
        "Attached",
    );
    let out = curl(testbed.in_client_netns("curl"), &url, &[]);
    assert!(out.status.success(), "{out:?}");
    stop_cleanly(port_nat, "port-nat");

    // Without CAP_PERFMON the verifier refuses port-nat (and bypass's
    // bpf_probe_read_kernel), which is said in one line before loading:
    // the runs above really had only these.
    let fewer: Vec<String> = caps
        .iter()
        .filter(|cap| *cap != "CAP_PERFMON")
        .cloned()
        .collect();
    let mut command =
        proxy_redirect::sys::netns::command_in("setpriv", Some(&testbed.server), None).unwrap();
    command.args(with_capabilities(&fewer, &args));
    assert_one_line_error(
        &run(command),
        "port-nat without CAP_PERFMON",
        "needs CAP_PERFMON",
    );
}

#[test]
fn tproxy_runs_with_only_the_units_capabilities() {
    let gw = root_gateway!();
    let _web = servers::http(&gw.server, "[::]:80").unwrap();
    let args = ["tproxy", "-i", gateway::CLIENT_FACING, "-P", "80"];
    let tproxy = Running::start(
        "setpriv",
        &with_capabilities(&unit_capabilities(), &args),
        Some(&gw.gateway),
        None,
        "Attached",
    );
    // The built-in transparent proxy (IP_TRANSPARENT) relays it: the server
    // sees the gateway's address, not the client's.
    let out = curl(
        gw.in_client("curl"),
        &format!("http://{}/", gateway::SERVER4),
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.starts_with(&format!("peer=[::ffff:{}]:", gateway::GATEWAY_SERVER_SIDE4)),
        "{body}"
    );
    let output = stop_cleanly(tproxy, "tproxy");
    assert_eq!(stat(&output, "connections intercepted"), 1, "{output}");
}

/// The manifest as JSON, through python3's yaml module.
fn daemonset_documents() -> Option<Vec<serde_json::Value>> {
    let script = "import json, sys, yaml\n\
                  print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))";
    let module = Command::new(PYTHON)
        .args(["-c", "import yaml"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !have("python3's yaml module (package python3-yaml)", module) {
        return None;
    }
    let mut command = Command::new(PYTHON);
    command.args(["-c", script, DAEMONSET]);
    let out = run(command);
    assert!(
        out.status.success(),
        "{DAEMONSET} is not valid YAML: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

#[test]
fn the_daemonset_is_valid_yaml_and_matches_the_unit() {
    let Some(documents) = daemonset_documents() else {
        return;
    };
    let kinds: Vec<&str> = documents
        .iter()
        .map(|doc| doc["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["ConfigMap", "DaemonSet"]);
    let (config_map, daemonset) = (&documents[0], &documents[1]);

    // A new pod starts beside the old one on its node and takes over.
    let rollout = &daemonset["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(rollout["maxSurge"], 1);
    assert_eq!(rollout["maxUnavailable"], 0);
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    let container = &pod["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["privileged"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let mut added: Vec<String> = security["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|cap| format!("CAP_{}", cap.as_str().unwrap()))
        .collect();
    added.sort();
    assert_eq!(added, unit_capabilities());

    // The config the pod reads is the ConfigMap's, and the service accepts it.
    let command: Vec<&str> = container["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|arg| arg.as_str().unwrap())
        .collect();
    let config_path = command[command.iter().position(|a| *a == "--config").unwrap() + 1];
    for flag in ["--take-over", "--stay-after-hand-over"] {
        assert!(command.contains(&flag), "{command:?} lacks {flag}");
    }
    // The kubelet's SIGTERM lets an old pod drain for --drain-timeout.
    assert!(pod["terminationGracePeriodSeconds"].as_u64() >= Some(310));
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "config")
        .unwrap();
    assert_eq!(
        config_path,
        format!("{}/config.toml", mount["mountPath"].as_str().unwrap())
    );
    let text = config_map["data"]["config.toml"].as_str().unwrap();
    let config = proxy_redirect::service::config::parse(text).unwrap();

    // The liveness probe asks the metrics address the config serves.
    let listen = config.metrics.expect("a [metrics] section");
    let probe = &container["livenessProbe"]["httpGet"];
    assert_eq!(probe["path"], "/metrics");
    assert_eq!(probe["port"], listen.port());
    assert_eq!(probe["host"], listen.ip().to_string());
}
