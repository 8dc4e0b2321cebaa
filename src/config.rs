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

use std::any::TypeId;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{anyhow, bail, Result};
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Arg, ArgAction, Args, Command};
use toml::{Table, Value};

use crate::bypass::BypassArgs;
use crate::cli::{OutputArgs, PortList};
use crate::port_nat::{self, PortNatArgs};
use crate::redirect::RedirectArgs;
use crate::tproxy::TproxyArgs;

/// What `run --config` runs: at least one datapath, and where to serve metrics.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub redirect: Option<RedirectArgs>,
    pub bypass: Option<BypassArgs>,
    /// `[[port-nat]]`, one per interface (the section repeats).
    pub port_nat: Vec<PortNatArgs>,
    pub tproxy: Option<TproxyArgs>,
    /// `[metrics] listen = "127.0.0.1:9477"`
    pub metrics: Option<SocketAddr>,
}

const SECTIONS: &str = "[redirect], [bypass], [[port-nat]], [tproxy] and [metrics]";

/// Reads and parses the file; every error is one line starting with the path.
pub fn load(path: &Path) -> Result<ServiceConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| anyhow!("reading {}: {err}", path.display()))?;
    parse(&text).map_err(|err| anyhow!("{}: {err}", path.display()))
}

/// Parses and checks a whole file; the error names the section and the key.
pub fn parse(text: &str) -> Result<ServiceConfig> {
    let table: Table = text.parse().map_err(|err| syntax_error(text, &err))?;
    let mut config = ServiceConfig {
        redirect: None,
        bypass: None,
        port_nat: Vec::new(),
        tproxy: None,
        metrics: None,
    };
    for (name, value) in &table {
        match name.as_str() {
            "redirect" => config.redirect = Some(datapath("[redirect]", single(name, value)?)?),
            "bypass" => config.bypass = Some(datapath("[bypass]", single(name, value)?)?),
            "tproxy" => config.tproxy = Some(datapath("[tproxy]", single(name, value)?)?),
            "port-nat" => {
                for (i, section) in repeated(name, value)?.into_iter().enumerate() {
                    config.port_nat.push(port_nat_section(i + 1, section)?);
                }
            }
            "metrics" => config.metrics = Some(metrics(single(name, value)?)?),
            _ if value.is_table() => bail!("unknown section [{name}]; the sections are {SECTIONS}"),
            _ => bail!("key '{name}' is outside any section; the sections are {SECTIONS}"),
        }
    }
    if config.redirect.is_none()
        && config.bypass.is_none()
        && config.port_nat.is_empty()
        && config.tproxy.is_none()
    {
        bail!("no datapath to run: add at least one of [redirect], [bypass], [[port-nat]] or [tproxy]");
    }
    check_tc_interfaces(&config)?;
    Ok(config)
}

/// One TC datapath per interface: port-nat and tproxy return TC_ACT_OK
/// (TCX_PASS) for the packets they leave alone, which ends the chain, so a
/// second program on the same interface would never see a packet.
fn check_tc_interfaces(config: &ServiceConfig) -> Result<()> {
    // (section, key, interface)
    let mut users: Vec<(String, &str, &str)> = Vec::new();
    for (i, args) in config.port_nat.iter().enumerate() {
        users.push((
            format!("[port-nat #{}]", i + 1),
            "interface",
            &args.interface,
        ));
    }
    if let Some(tproxy) = &config.tproxy {
        users.push(("[tproxy]".into(), "interface", &tproxy.interface));
        if let Some(upstream) = &tproxy.upstream_interface {
            users.push(("[tproxy]".into(), "upstream-interface", upstream));
        }
    }
    for (i, (section, key, interface)) in users.iter().enumerate() {
        if let Some((first, _, _)) = users[..i].iter().find(|(_, _, other)| other == interface) {
            bail!(
                "{section} {key}: '{interface}' already runs {first}: only the first TC program \
                 on an interface sees its packets (give one [[port-nat]] all of its mappings)"
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
        _ => bail!("key '{name}' is outside any section; the sections are {SECTIONS}"),
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
                    anyhow!("key '{name}' is outside any section; the sections are {SECTIONS}")
                })
            })
            .collect(),
        _ => bail!("key '{name}' is outside any section; the sections are {SECTIONS}"),
    }
}

fn port_nat_section(number: usize, table: &Table) -> Result<PortNatArgs> {
    let label = format!("[port-nat #{number}]");
    let args: PortNatArgs = datapath(&label, table)?;
    // clap cannot pair `from` with `to`; the subcommand does it in run().
    if args.from.len() != args.to.len() {
        bail!(
            "{label} from, to: {} 'from' port(s) but {} 'to' port(s); they pair up in order",
            args.from.len(),
            args.to.len()
        );
    }
    port_nat::mappings(&args.from, &args.to).map_err(|err| anyhow!("{label} from, to: {err}"))?;
    Ok(args)
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

/// Parses a datapath section with its subcommand's clap definition.
fn datapath<A: Args>(label: &str, table: &Table) -> Result<A> {
    let command = A::augment_args(
        Command::new("section")
            .no_binary_name(true)
            .disable_help_flag(true),
    );
    let argv = command_line(label, &command, table)?;
    let matches = command
        .try_get_matches_from(argv)
        .map_err(|err| anyhow!("{label} {}", clap_error(&err)))?;
    A::from_arg_matches(&matches).map_err(|err| anyhow!("{label} {}", clap_error(&err)))
}

/// The TOML type a key takes, from its clap argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A flag: `true` gives `--key`, `false` nothing.
    Flag,
    Integer,
    String,
    /// A comma-separated port list on the command line, an array here.
    Ports,
}

fn kind(arg: &Arg) -> Kind {
    let parsed = arg.get_value_parser().type_id();
    let integers = [
        TypeId::of::<u8>(),
        TypeId::of::<u16>(),
        TypeId::of::<u32>(),
        TypeId::of::<u64>(),
    ];
    if matches!(arg.get_action(), ArgAction::SetTrue) {
        Kind::Flag
    } else if parsed == TypeId::of::<PortList>() {
        Kind::Ports
    } else if integers.iter().any(|integer| parsed == *integer) {
        Kind::Integer
    } else {
        Kind::String
    }
}

/// The keys that would repeat in every section but belong to the whole service.
fn service_wide_keys() -> Vec<String> {
    let output = OutputArgs::augment_args(Command::new("output"));
    output
        .get_arguments()
        .filter_map(|arg| arg.get_long().map(str::to_owned))
        .collect()
}

/// The section as the subcommand's arguments: `--key=value` each.
fn command_line(label: &str, command: &Command, table: &Table) -> Result<Vec<String>> {
    let service_wide = service_wide_keys();
    let mut argv = Vec::new();
    for (key, value) in table {
        if service_wide.contains(key) {
            bail!(
                "{label} {key}: applies to the whole service; set it under [metrics] \
                 or on the run command line"
            );
        }
        let Some(arg) = command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(key))
        else {
            let dashed = key.replace('_', "-");
            if dashed != *key
                && command
                    .get_arguments()
                    .any(|a| a.get_long() == Some(&dashed))
            {
                bail!("{label} unknown key '{key}'; keys are written with dashes: '{dashed}'");
            }
            bail!("{label} unknown key '{key}'");
        };
        let kind = kind(arg);
        let repeatable = matches!(arg.get_action(), ArgAction::Append);
        let values: Vec<String> = match (value, kind) {
            (Value::Boolean(true), Kind::Flag) => {
                argv.push(format!("--{key}"));
                continue;
            }
            (Value::Boolean(false), Kind::Flag) => continue,
            (Value::Array(items), Kind::Ports) => {
                let ports = items
                    .iter()
                    .map(|item| scalar(item, Kind::Integer))
                    .collect::<Result<Vec<_>, _>>();
                vec![ports
                    .map_err(|err| anyhow!("{label} {key}: {err}"))?
                    .join(",")]
            }
            (Value::Array(items), _) if repeatable => items
                .iter()
                .map(|item| scalar(item, kind))
                .collect::<Result<_, _>>()
                .map_err(|err| anyhow!("{label} {key}: {err}"))?,
            (Value::Integer(_), Kind::Ports) => vec![scalar(value, Kind::Integer)?],
            _ => vec![scalar(value, kind).map_err(|err| anyhow!("{label} {key}: {err}"))?],
        };
        // `--key=value`, so that a value starting with '-' stays a value.
        argv.extend(values.into_iter().map(|value| format!("--{key}={value}")));
    }
    Ok(argv)
}

/// One value as command-line text, if it has the type the key takes.
fn scalar(value: &Value, kind: Kind) -> Result<String> {
    match (kind, value) {
        (Kind::Integer, Value::Integer(number)) => Ok(number.to_string()),
        (Kind::String, Value::String(text)) => Ok(text.clone()),
        (Kind::Integer, _) => bail!("expected an integer, got {}", type_name(value)),
        (Kind::String, _) => bail!("expected a string, got {}", type_name(value)),
        (Kind::Flag, _) => bail!("expected true or false, got {}", type_name(value)),
        (Kind::Ports, _) => bail!(
            "expected a list of ports such as [80, 443], got {}",
            type_name(value)
        ),
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

/// clap's error as `key: what is wrong`, in the file's terms.
fn clap_error(err: &clap::Error) -> String {
    // clap names arguments as `--key <VALUE>`.
    let key_of = |text: &str| {
        let name = text.split_whitespace().next().unwrap_or(text);
        name.trim_start_matches('-').to_owned()
    };
    let keys: Vec<String> = match err.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => vec![key_of(arg)],
        Some(ContextValue::Strings(args)) => args.iter().map(|arg| key_of(arg)).collect(),
        _ => Vec::new(),
    };
    let value = match err.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(value)) => value.clone(),
        _ => String::new(),
    };
    match err.kind() {
        ErrorKind::MissingRequiredArgument => {
            let quoted: Vec<String> = keys.iter().map(|key| format!("'{key}'")).collect();
            format!("missing key {}", quoted.join(", "))
        }
        ErrorKind::ValueValidation => {
            let source = std::error::Error::source(err);
            // The standard library's parse errors do not quote the value.
            let bare = source.is_some_and(|source| {
                source.is::<std::num::ParseIntError>() || source.is::<std::net::AddrParseError>()
            });
            match source {
                Some(source) if !bare => format!("{}: {source}", keys.join(", ")),
                Some(source) => format!("{}: invalid value '{value}': {source}", keys.join(", ")),
                None => format!("{}: invalid value '{value}'", keys.join(", ")),
            }
        }
        ErrorKind::InvalidValue => {
            let valid = match err.get(ContextKind::ValidValue) {
                Some(ContextValue::Strings(valid)) => format!("; one of {}", valid.join(", ")),
                _ => String::new(),
            };
            format!("{}: invalid value '{value}'{valid}", keys.join(", "))
        }
        _ => {
            let rendered = err.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid value");
            let message = first.strip_prefix("error: ").unwrap_or(first);
            if keys.is_empty() {
                message.to_owned()
            } else {
                format!("{}: {message}", keys.join(", "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> String {
        format!("{:#}", parse(text).unwrap_err())
    }

    #[test]
    fn a_full_file_parses_into_each_subcommands_arguments() {
        let config = parse(
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
        .unwrap();

        let redirect = config.redirect.unwrap();
        assert_eq!(redirect.cgroup.unwrap().to_str(), Some("pods.slice"));
        assert_eq!(redirect.ports, PortList(vec![80, 443]));
        assert_eq!(redirect.proxy_port, 15001);
        assert!(redirect.no_proxy);
        assert_eq!(redirect.include.len(), 2);
        assert_eq!(redirect.include[1].to_string(), "fd00::/8");
        assert_eq!(redirect.exclude_user.as_deref(), Some("proxy"));
        assert_eq!(redirect.mark, 0x5052);
        assert_eq!(redirect.when_proxy_down, crate::redirect::ProxyDown::Closed);
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
        let config = parse(include_str!("../deploy/config.toml")).unwrap();
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
        let readme = include_str!("../README.md");
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
            "[port-nat #2] interface: 'eth0' already runs [port-nat #1]: only the first TC \
             program on an interface sees its packets (give one [[port-nat]] all of its mappings)"
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
