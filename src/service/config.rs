//! The service's configuration file (`proxy-redirect run --config FILE`).
//!
//! ```toml
//! [redirect]
//! cgroup = "pods.slice"
//! ports = [80, 443]
//!
//! [[port-nat]]
//! interface = "eth0"
//! from = [8080]
//! to = [80]
//!
//! [metrics]
//! listen = "127.0.0.1:9477"
//! ```
//!
//! A datapath section's keys are its subcommand's long option names. Each
//! section is turned back into that subcommand's command line and parsed by
//! the subcommand's own clap definition, so the file accepts exactly what
//! the command line accepts and checks it the same way.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{anyhow, bail, Result};
use toml::{Table, Value};

use crate::cli::toml::type_name;
use crate::datapath::{Settings, SECTIONS};

/// What `run --config` runs: at least one datapath, and where to serve metrics.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// In the order of the registry's sections; `[[port-nat]]` repeats,
    /// one per interface.
    pub datapaths: Vec<Settings>,
    /// `[metrics] listen = "127.0.0.1:9477"`
    pub metrics: Option<SocketAddr>,
}

/// `[redirect], [bypass], [[port-nat]], [tproxy]`, as the file writes them.
fn section_names() -> Vec<String> {
    SECTIONS
        .iter()
        .map(|section| match section.repeats {
            true => format!("[[{}]]", section.name),
            false => format!("[{}]", section.name),
        })
        .collect()
}

fn all_sections() -> String {
    format!("{} and [metrics]", section_names().join(", "))
}

/// Reads and parses the file; every error is one line starting with the path.
pub fn load(path: &Path) -> Result<ServiceConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| anyhow!("reading {}: {err}", path.display()))?;
    parse(&text).map_err(|err| anyhow!("{}: {err}", path.display()))
}

/// Parses and checks a whole file; the error names the section and the key.
pub fn parse(text: &str) -> Result<ServiceConfig> {
    let table: Table = text.parse().map_err(|err| syntax_error(text, &err))?;
    for (name, value) in &table {
        if name != "metrics" && !SECTIONS.iter().any(|section| section.name == name) {
            match value.is_table() {
                true => bail!(
                    "unknown section [{name}]; the sections are {}",
                    all_sections()
                ),
                false => bail!(
                    "key '{name}' is outside any section; the sections are {}",
                    all_sections()
                ),
            }
        }
    }
    // (label, settings)
    let mut datapaths: Vec<(String, Settings)> = Vec::new();
    for section in SECTIONS {
        let Some(value) = table.get(section.name) else {
            continue;
        };
        let name = section.name;
        if section.repeats {
            for (i, each) in repeated(name, value)?.into_iter().enumerate() {
                let label = format!("[{name} #{}]", i + 1);
                datapaths.push((label.clone(), (section.parse)(&label, each)?));
            }
        } else {
            let label = format!("[{name}]");
            datapaths.push((
                label.clone(),
                (section.parse)(&label, single(name, value)?)?,
            ));
        }
    }
    let metrics = table
        .get("metrics")
        .map(|value| metrics(single("metrics", value)?))
        .transpose()?;
    if datapaths.is_empty() {
        let names = section_names();
        let (last, first) = names.split_last().expect("the registry names datapaths");
        bail!(
            "no datapath to run: add at least one of {} or {last}",
            first.join(", ")
        );
    }
    check_tc_interfaces(&datapaths)?;
    Ok(ServiceConfig {
        datapaths: datapaths
            .into_iter()
            .map(|(_, settings)| settings)
            .collect(),
        metrics,
    })
}

/// One TC datapath of ours per interface: on the clsact fallback our
/// filters share one handle, so a second would replace the first, and two
/// translations of one interface would each see the other's rewrites.
fn check_tc_interfaces(datapaths: &[(String, Settings)]) -> Result<()> {
    // (section, key, interface)
    let mut users: Vec<(&str, &str, &str)> = Vec::new();
    for (label, settings) in datapaths {
        for (key, interface) in settings.tc_interfaces() {
            users.push((label, key, interface));
        }
    }
    for (i, (section, key, interface)) in users.iter().enumerate() {
        if let Some((first, _, _)) = users[..i].iter().find(|(_, _, other)| other == interface) {
            bail!(
                "{section} {key}: '{interface}' already runs {first}: one TC datapath of ours \
                 per interface (give one [[port-nat]] all of its mappings)"
            );
        }
    }
    Ok(())
}

/// `line L, column C: message`, on one line.
fn syntax_error(text: &str, err: &toml::de::Error) -> anyhow::Error {
    let message = err
        .message()
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    match err.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            anyhow!("line {line}, column {column}: {message}")
        }
        None => anyhow!("{message}"),
    }
}

/// A section that may appear once: `[name]`.
fn single<'a>(name: &str, value: &'a Value) -> Result<&'a Table> {
    match value {
        Value::Table(table) => Ok(table),
        Value::Array(_) => bail!("[[{name}]] may appear only once: write [{name}]"),
        _ => bail!(
            "key '{name}' is outside any section; the sections are {}",
            all_sections()
        ),
    }
}

/// A section that may repeat: `[[name]]` (a single `[name]` counts as one).
fn repeated<'a>(name: &str, value: &'a Value) -> Result<Vec<&'a Table>> {
    match value {
        Value::Table(table) => Ok(vec![table]),
        Value::Array(items) => items
            .iter()
            .map(|item| {
                item.as_table().ok_or_else(|| {
                    anyhow!(
                        "key '{name}' is outside any section; the sections are {}",
                        all_sections()
                    )
                })
            })
            .collect(),
        _ => bail!(
            "key '{name}' is outside any section; the sections are {}",
            all_sections()
        ),
    }
}

fn metrics(table: &Table) -> Result<SocketAddr> {
    if let Some(key) = table.keys().find(|key| *key != "listen") {
        bail!("[metrics] unknown key '{key}'; the only key is listen");
    }
    match table.get("listen") {
        None => bail!("[metrics] missing key 'listen' (such as listen = \"127.0.0.1:9477\")"),
        Some(Value::String(text)) => text.parse().map_err(|_| {
            anyhow!("[metrics] listen: '{text}' is not an address and port such as 127.0.0.1:9477 or [::1]:9477")
        }),
        Some(other) => bail!(
            "[metrics] listen: expected a string, got {}",
            type_name(other)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::PortList;
    use crate::datapath::bypass::BypassArgs;
    use crate::datapath::port_nat::{self, PortNatArgs};
    use crate::datapath::redirect::RedirectArgs;
    use crate::datapath::tproxy::TproxyArgs;

    /// A parsed file by section, as the assertions name them.
    struct Sections {
        redirect: Option<RedirectArgs>,
        bypass: Option<BypassArgs>,
        port_nat: Vec<PortNatArgs>,
        tproxy: Option<TproxyArgs>,
        metrics: Option<SocketAddr>,
    }

    fn sections(config: ServiceConfig) -> Sections {
        let mut sections = Sections {
            redirect: None,
            bypass: None,
            port_nat: Vec::new(),
            tproxy: None,
            metrics: config.metrics,
        };
        for settings in config.datapaths {
            match settings {
                Settings::Redirect(args) => sections.redirect = Some(args),
                Settings::Bypass(args) => sections.bypass = Some(args),
                Settings::PortNat(args) => sections.port_nat.push(args),
                Settings::Tproxy(args) => sections.tproxy = Some(args),
                Settings::Proxy(_) => unreachable!("no config section makes the proxy alone"),
            }
        }
        sections
    }

    fn error(text: &str) -> String {
        format!("{:#}", parse(text).unwrap_err())
    }

    #[test]
    fn a_full_file_parses_into_each_subcommands_arguments() {
        let config = sections(
            parse(
                r#"
            [redirect]
            cgroup = "pods.slice"
            ports = [80, 443]
            proxy-port = 15001
            no-proxy = true
            include = ["10.0.0.0/8", "fd00::/8"]
            exclude-user = "proxy"
            mark = 0x5052
            when-proxy-down = "closed"

            [bypass]
            cgroup = "pods.slice"
            ports = 6379
            splice-readers = ["envoy", "nginx"]

            [[port-nat]]
            interface = "eth0"
            from = [8080, 5300]
            to = [80, 53]
            proto = "all"

            [[port-nat]]
            interface = "eth1"
            from = 8443
            to = 443
            proto = "tcp"

            [tproxy]
            interface = "br0"
            ports = [80]
            proxy-port = 3129
            no-proxy = false

            [metrics]
            listen = "127.0.0.1:9477"
            "#,
            )
            .unwrap(),
        );

        let redirect = config.redirect.unwrap();
        assert_eq!(redirect.cgroup.unwrap().to_str(), Some("pods.slice"));
        assert_eq!(redirect.ports, PortList(vec![80, 443]));
        assert_eq!(redirect.proxy_port, 15001);
        assert!(redirect.no_proxy);
        assert_eq!(redirect.include.len(), 2);
        assert_eq!(redirect.include[1].to_string(), "fd00::/8");
        assert_eq!(redirect.exclude_user.as_deref(), Some("proxy"));
        assert_eq!(redirect.mark, 0x5052);
        assert_eq!(
            redirect.when_proxy_down,
            crate::datapath::redirect::ProxyDown::Closed
        );
        // Defaults are the command line's.
        assert_eq!(redirect.relay.idle_timeout, 3600);
        assert!(redirect.udp_ports.is_none());

        let bypass = config.bypass.unwrap();
        assert_eq!(bypass.ports, Some(PortList(vec![6379])));
        assert_eq!(bypass.splice_readers, ["envoy", "nginx"]);

        assert_eq!(config.port_nat.len(), 2);
        assert_eq!(config.port_nat[0].interface, "eth0");
        assert_eq!(config.port_nat[0].from, [8080, 5300]);
        assert_eq!(config.port_nat[0].to, [80, 53]);
        assert_eq!(config.port_nat[0].proto, port_nat::Protocols::All);
        assert_eq!(config.port_nat[1].from, [8443]);
        assert_eq!(config.port_nat[1].proto, port_nat::Protocols::Tcp);

        let tproxy = config.tproxy.unwrap();
        assert_eq!(tproxy.interface, "br0");
        assert_eq!(tproxy.proxy_port, 3129);
        assert!(!tproxy.no_proxy);

        assert_eq!(config.metrics, Some("127.0.0.1:9477".parse().unwrap()));
    }

    #[test]
    fn the_example_in_deploy_parses() {
        let config = sections(parse(include_str!("../../deploy/config.toml")).unwrap());
        assert!(config.redirect.is_some());
        assert!(config.bypass.is_some());
        assert!(!config.port_nat.is_empty());
        assert!(config.tproxy.is_some());
        assert!(config.metrics.is_some());
    }

    /// Every `key = value` the README's service section shows is accepted
    /// by some section (only keys another section requires may be missing).
    #[test]
    fn the_readme_shows_real_keys_and_values() {
        let readme = include_str!("../../README.md");
        let start = readme.find("## Run as a service").unwrap();
        let section = &readme[start..];
        let end = section[1..].find("\n## ").unwrap() + 1;
        let snippets: Vec<&str> = section[..end]
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|code| code.contains(" = "))
            .collect();
        assert!(snippets.len() >= 9, "{snippets:?}");
        for snippet in snippets {
            let text = match snippet.strip_prefix("[metrics] ") {
                Some(line) => format!("[bypass]\n[metrics]\n{line}"),
                None => snippet.to_owned(),
            };
            let accepted = ["[redirect]", "[bypass]", "[[port-nat]]", "[tproxy]"]
                .iter()
                .any(|header| match parse(&format!("{header}\n{text}")) {
                    Ok(_) => true,
                    Err(err) => err.to_string().contains("missing key"),
                });
            assert!(
                accepted,
                "the README shows `{snippet}`, which no section accepts"
            );
        }
    }

    #[test]
    fn a_bad_value_names_the_section_and_the_key() {
        assert_eq!(
            error("[redirect]\nports = [80, 70000]"),
            "[redirect] ports: port 70000 is out of range (1-65535)"
        );
        assert_eq!(
            error("[redirect]\nproxy-port = 0"),
            "[redirect] proxy-port: port 0 is out of range (1-65535)"
        );
        assert_eq!(
            error("[redirect]\ninclude = [\"10.0.0.0/33\"]"),
            "[redirect] include: '10.0.0.0/33' has a bad prefix length (0-32)"
        );
        assert_eq!(
            error("[[port-nat]]\ninterface = \"eth0\"\nfrom = [8080]\nto = [80]\nproto = \"sctp\""),
            "[port-nat #1] proto: invalid value 'sctp'; one of tcp, udp, all"
        );
        assert_eq!(
            error("[redirect]\nproxy-ip = [\"127.0.0.1\", \"::1::\"]"),
            "[redirect] proxy-ip: invalid value '::1::': invalid IP address syntax"
        );
        assert_eq!(
            error("[redirect]\nudp-idle-timeout = 0"),
            "[redirect] udp-idle-timeout: 0 is not in 1..=86400"
        );
    }

    #[test]
    fn a_repeated_section_is_numbered() {
        let text = "[[port-nat]]\ninterface = \"eth0\"\nfrom = [8080]\nto = [80]\n\
                    [[port-nat]]\ninterface = 7\nfrom = [8443]\nto = [443]\n";
        assert_eq!(
            error(text),
            "[port-nat #2] interface: expected a string, got an integer"
        );
        let twice = "[[port-nat]]\ninterface = \"eth0\"\nfrom = [8080]\nto = [80]\n\
                     [[port-nat]]\ninterface = \"eth0\"\nfrom = [8443]\nto = [443]\n";
        assert_eq!(
            error(twice),
            "[port-nat #2] interface: 'eth0' already runs [port-nat #1]: one TC datapath of \
             ours per interface (give one [[port-nat]] all of its mappings)"
        );
        let shared = "[[port-nat]]\ninterface = \"eth0\"\nfrom = [8080]\nto = [80]\n\
                      [tproxy]\ninterface = \"br0\"\nupstream-interface = \"eth0\"\n";
        assert!(
            error(shared)
                .starts_with("[tproxy] upstream-interface: 'eth0' already runs [port-nat #1]: "),
            "{}",
            error(shared)
        );
        assert_eq!(
            error("[[port-nat]]\nfrom = [8080]\nto = [80]"),
            "[port-nat #1] missing key 'interface'"
        );
        assert_eq!(
            error("[[port-nat]]\ninterface = \"eth0\"\nfrom = [8080, 8443]\nto = [80]"),
            "[port-nat #1] from, to: 2 'from' port(s) but 1 'to' port(s); they pair up in order"
        );
    }

    #[test]
    fn unknown_keys_and_sections_are_refused() {
        assert_eq!(
            error("[redirect]\nport = 80"),
            "[redirect] unknown key 'port'"
        );
        assert_eq!(
            error("[redirect]\nproxy_port = 15001"),
            "[redirect] unknown key 'proxy_port'; keys are written with dashes: 'proxy-port'"
        );
        assert_eq!(
            error("[foo]\nbar = 1"),
            "unknown section [foo]; the sections are [redirect], [bypass], [[port-nat]], [tproxy] and [metrics]"
        );
        assert_eq!(
            error("cgroup = \"pods.slice\"\n[redirect]"),
            "key 'cgroup' is outside any section; the sections are [redirect], [bypass], [[port-nat]], [tproxy] and [metrics]"
        );
        assert_eq!(
            error("[[redirect]]\n[[redirect]]"),
            "[[redirect]] may appear only once: write [redirect]"
        );
        assert_eq!(
            error("[redirect]\nhelp = true"),
            "[redirect] unknown key 'help'"
        );
    }

    #[test]
    fn wrong_types_are_named() {
        assert_eq!(
            error("[bypass]\ncgroup = 5"),
            "[bypass] cgroup: expected a string, got an integer"
        );
        assert_eq!(
            error("[redirect]\nports = \"80,443\""),
            "[redirect] ports: expected a list of ports such as [80, 443], got a string"
        );
        assert_eq!(
            error("[redirect]\nports = [80, \"443\"]"),
            "[redirect] ports: expected an integer, got a string"
        );
        assert_eq!(
            error("[redirect]\nno-proxy = \"yes\""),
            "[redirect] no-proxy: expected true or false, got a string"
        );
        assert_eq!(
            error("[redirect]\ncgroup = [\"a\", \"b\"]"),
            "[redirect] cgroup: expected a string, got an array"
        );
        assert_eq!(
            error("[tproxy]\ninterface = \"br0\"\nproxy-port = 3129.5"),
            "[tproxy] proxy-port: expected an integer, got a float"
        );
    }

    #[test]
    fn service_wide_keys_are_refused_in_a_datapath() {
        for key in [
            "verbose = true",
            "json = true",
            "metrics = \"127.0.0.1:9477\"",
        ] {
            let name = key.split(' ').next().unwrap();
            assert_eq!(
                error(&format!("[redirect]\n{key}")),
                format!(
                    "[redirect] {name}: applies to the whole service; set it under [metrics] \
                     or on the run command line"
                )
            );
        }
    }

    #[test]
    fn metrics_takes_only_listen() {
        let redirect = "[redirect]\n";
        assert_eq!(
            error(&format!("{redirect}[metrics]\nlisten = \"127.0.0.1\"")),
            "[metrics] listen: '127.0.0.1' is not an address and port such as 127.0.0.1:9477 or [::1]:9477"
        );
        assert_eq!(
            error(&format!(
                "{redirect}[metrics]\nlisten = \"[::1]:9477\"\nport = 9477"
            )),
            "[metrics] unknown key 'port'; the only key is listen"
        );
        assert_eq!(
            error(&format!("{redirect}[metrics]")),
            "[metrics] missing key 'listen' (such as listen = \"127.0.0.1:9477\")"
        );
        let config = parse(&format!("{redirect}[metrics]\nlisten = \"[::1]:9477\"")).unwrap();
        assert_eq!(config.metrics, Some("[::1]:9477".parse().unwrap()));
    }

    #[test]
    fn a_file_without_a_datapath_is_refused() {
        assert_eq!(
            error("[metrics]\nlisten = \"127.0.0.1:9477\""),
            "no datapath to run: add at least one of [redirect], [bypass], [[port-nat]] or [tproxy]"
        );
        assert!(error("").starts_with("no datapath"));
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let message = error("[redirect]\nports = [80, 443\ncgroup = \"a\"\n");
        assert!(message.starts_with("line 3, column "), "{message}");
        assert!(!message.contains('\n'), "{message}");
        let message = error("[redirect]\ncgroup = \"a\"\ncgroup = \"b\"\n");
        assert!(message.starts_with("line 3, column 1: "), "{message}");
    }

    #[test]
    fn load_names_the_file() {
        let path =
            std::env::temp_dir().join(format!("proxy-redirect-config-{}.toml", std::process::id()));
        std::fs::write(&path, "[bypass]\ncgroup = 5\n").unwrap();
        let message = format!("{:#}", load(&path).unwrap_err());
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            message,
            format!(
                "{}: [bypass] cgroup: expected a string, got an integer",
                path.display()
            )
        );
        let message = format!("{:#}", load(&path).unwrap_err());
        assert!(
            message.starts_with(&format!("reading {}: ", path.display())),
            "{message}"
        );
    }
}
