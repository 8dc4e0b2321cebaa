//! Policy routing that delivers marked packets locally: per address family
//! `ip rule add pref PRIO fwmark MARK iif IFACE lookup TABLE` and
//! `ip route add local default dev lo table TABLE`, as TPROXY set-ups and
//! `tproxy` need.
//!
//! Everything added carries the routing protocol number [`RT_PROTO`] on top
//! of its dedicated priority and table, so that leftovers of a killed run are
//! recognised exactly and nothing of anyone else is ever removed.

use anyhow::{bail, Context, Result};

use crate::sys::netns::ip;

/// `proto 82` on our rules and routes (`/etc/iproute2/rt_protos` leaves it
/// unnamed).
pub const RT_PROTO: u8 = 82;

/// The pin record (see `PinDir::record`) of a datapath with local routes:
/// [table, rule priority, the network namespace's inode].
pub const RECORD: &str = "routes";

/// Removes, in this network namespace, the rules and routes that the
/// datapath pinned in `dir` recorded (a killed service's, for `cleanup`);
/// says what it removed, or why it could not.
pub fn remove_recorded(dir: &std::path::Path) -> Vec<String> {
    let Some([table, priority, netns]) = crate::sys::pins::read_record(dir, RECORD)
        .and_then(|values| <[u64; 3]>::try_from(values).ok())
    else {
        return Vec::new();
    };
    let here =
        std::fs::metadata("/proc/self/ns/net").map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    if here.ok() != Some(netns) {
        return vec![format!(
            "the rules and routes of table {table} stay: they are in another network \
             namespace (inode {netns}); run cleanup there, or start tproxy there"
        )];
    }
    let spec = LocalRouteSpec {
        mark: 0,
        table: table as u32,
        priority: priority as u32,
        interfaces: Vec::new(),
    };
    match remove_leftovers(&spec) {
        Ok(removed) => removed,
        Err(err) => vec![format!("{err:#}")],
    }
}

/// Tables the kernel reserves: unspec, default, main, local.
const RESERVED_TABLES: [u32; 4] = [0, 253, 254, 255];

/// What to route where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalRouteSpec {
    pub mark: u32,
    pub table: u32,
    pub priority: u32,
    /// Only packets received on these interfaces (`iif`, one rule each);
    /// locally generated packets never match, whatever their mark.
    pub interfaces: Vec<String>,
}

const FAMILIES: [&str; 2] = ["-4", "-6"];

impl LocalRouteSpec {
    pub fn validate(&self) -> Result<()> {
        if RESERVED_TABLES.contains(&self.table) {
            bail!(
                "routing table {} is reserved by the kernel; pick another (1-252, 256-)",
                self.table
            );
        }
        if self.priority == 0 || self.priority >= 32766 {
            bail!(
                "rule priority {} must come after the local table (0) and before main (32766)",
                self.priority
            );
        }
        if self.mark == 0 {
            bail!("the routing mark must not be 0");
        }
        Ok(())
    }

    fn rule_args(&self, family: &str, interface: &str, verb: &str) -> Vec<String> {
        let mut args: Vec<String> = vec![family.into(), "rule".into(), verb.into()];
        args.extend(
            [
                "pref",
                &self.priority.to_string(),
                "fwmark",
                &format!("{:#x}", self.mark),
                "iif",
                interface,
                "lookup",
                &self.table.to_string(),
                "protocol",
                &RT_PROTO.to_string(),
            ]
            .map(String::from),
        );
        args
    }

    /// `ip rule del` of one of our rules whatever its mark, on `iif`
    /// (none: a rule without one).
    fn leftover_rule_args(&self, family: &str, iif: &str) -> Vec<String> {
        let mut args: Vec<String> = vec![family.into(), "rule".into(), "del".into()];
        args.extend(
            [
                "pref",
                &self.priority.to_string(),
                "lookup",
                &self.table.to_string(),
                "protocol",
                &RT_PROTO.to_string(),
            ]
            .map(String::from),
        );
        if !iif.is_empty() {
            args.extend(["iif".into(), iif.to_owned()]);
        }
        args
    }

    fn route_args(&self, family: &str, verb: &str) -> Vec<String> {
        [
            family,
            "route",
            verb,
            "local",
            "default",
            "dev",
            "lo",
            "table",
            &self.table.to_string(),
            "proto",
            &RT_PROTO.to_string(),
        ]
        .map(String::from)
        .to_vec()
    }
}

fn ip_json(args: &[&str]) -> Result<Vec<serde_json::Value>> {
    let mut full: Vec<String> = vec!["-j".into(), "-N".into()];
    full.extend(args.iter().map(|a| a.to_string()));
    let text = ip(&full)?;
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(&text)
        .with_context(|| format!("parsing the output of ip {}", full.join(" ")))
}

fn field(entry: &serde_json::Value, name: &str) -> String {
    match &entry[name] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

/// Rules at our priority, pointing at our table, with our protocol.
fn our_rules(spec: &LocalRouteSpec, family: &str) -> Result<Vec<serde_json::Value>> {
    Ok(ip_json(&[family, "rule", "show"])?
        .into_iter()
        .filter(|r| {
            field(r, "priority") == spec.priority.to_string()
                && field(r, "table") == spec.table.to_string()
                && field(r, "protocol") == RT_PROTO.to_string()
        })
        .collect())
}

/// Every route in our table, ours or not.
fn table_routes(spec: &LocalRouteSpec, family: &str) -> Result<Vec<serde_json::Value>> {
    Ok(ip_json(&[family, "route", "show", "table", "all"])?
        .into_iter()
        .filter(|r| field(r, "table") == spec.table.to_string())
        .collect())
}

fn is_our_route(route: &serde_json::Value) -> bool {
    field(route, "protocol") == RT_PROTO.to_string()
        && matches!(field(route, "type").as_str(), "local" | "2")
        && field(route, "dst") == "default"
}

/// Fails, naming the rule, when a rule that is not ours would take packets
/// with our mark or sends packets to our table: Calico, Tailscale, dae and
/// others take marks and tables of their own.
pub fn check_neighbours(spec: &LocalRouteSpec) -> Result<()> {
    for family in FAMILIES {
        let ours = our_rules(spec, family)?;
        for rule in ip_json(&[family, "rule", "show"])? {
            if ours.contains(&rule) {
                continue;
            }
            if field(&rule, "table") == spec.table.to_string() {
                bail!(
                    "routing table {} is already used by the rule '{}' of another tool; pick \
                     another with --route-table",
                    spec.table,
                    describe_rule(&rule)
                );
            }
            if let Some((mark, mask)) = fwmark(&rule) {
                if spec.mark & mask == mark & mask {
                    bail!(
                        "the routing mark {:#x} is already matched by the rule '{}' of another \
                         tool; pick another with --route-mark",
                        spec.mark,
                        describe_rule(&rule)
                    );
                }
            }
        }
    }
    Ok(())
}

/// A rule's fwmark and mask, if it matches on one.
fn fwmark(rule: &serde_json::Value) -> Option<(u32, u32)> {
    let parse = |text: String| u32::from_str_radix(text.trim_start_matches("0x"), 16).ok();
    let mark = parse(field(rule, "fwmark"))?;
    let mask = parse(field(rule, "fwmask")).unwrap_or(u32::MAX);
    Some((mark, mask))
}

/// `pref 100 fwmark 0x5053/0xffff lookup 100`, as `ip rule` writes it.
fn describe_rule(rule: &serde_json::Value) -> String {
    let mut words = vec![format!("pref {}", field(rule, "priority"))];
    for (key, prefix) in [
        ("src", "srclen"),
        ("dst", "dstlen"),
        ("iif", ""),
        ("oif", ""),
    ] {
        let value = field(rule, key);
        if !value.is_empty() && value != "all" {
            match field(rule, prefix) {
                len if !prefix.is_empty() && !len.is_empty() => {
                    words.push(format!("{key} {value}/{len}"))
                }
                _ => words.push(format!("{key} {value}")),
            }
        }
    }
    if let Some((mark, mask)) = fwmark(rule) {
        match mask {
            u32::MAX => words.push(format!("fwmark {mark:#x}")),
            mask => words.push(format!("fwmark {mark:#x}/{mask:#x}")),
        }
    }
    words.push(format!("lookup {}", field(rule, "table")));
    words.join(" ")
}

/// Removes the rules and routes a killed run with the same table and
/// priority left, and returns what it removed (as `ip` prints it). Fails,
/// removing nothing, when the table holds routes that are not ours.
pub fn remove_leftovers(spec: &LocalRouteSpec) -> Result<Vec<String>> {
    let mut rules = Vec::new();
    let mut routes = Vec::new();
    for family in FAMILIES {
        for route in table_routes(spec, family)? {
            if !is_our_route(&route) {
                bail!(
                    "routing table {} already holds routes that tproxy did not add ({route}); \
                     pick another with --route-table",
                    spec.table
                );
            }
            routes.push((family, route));
        }
        for rule in our_rules(spec, family)? {
            rules.push((family, rule));
        }
    }
    let mut removed = Vec::new();
    for (family, rule) in rules {
        ip(&spec.leftover_rule_args(family, &field(&rule, "iif")))?;
        removed.push(format!("rule {rule}"));
    }
    for (family, route) in routes {
        ip(&spec.route_args(family, "del"))?;
        removed.push(format!("route {route}"));
    }
    Ok(removed)
}

/// The installed rules and routes; removed on drop, in reverse order
/// (unless the process hands them over to its successor).
pub struct LocalRoutes {
    undo: Vec<Vec<String>>,
}

impl LocalRoutes {
    /// Makes the rules and routes exactly `spec` while keeping those that
    /// are already as wanted (a predecessor's, or a killed run's that a
    /// restart adopts: not one packet is routed differently meanwhile);
    /// adds what is missing and removes our others. Returns what it
    /// removed, as `remove_leftovers` does.
    pub fn adopt(spec: &LocalRouteSpec) -> Result<(Self, Vec<String>)> {
        let mut removed = Vec::new();
        let mut installed = LocalRoutes { undo: Vec::new() };
        for family in FAMILIES {
            for route in table_routes(spec, family)? {
                if !is_our_route(&route) {
                    bail!(
                        "routing table {} already holds routes that tproxy did not add \
                         ({route}); pick another with --route-table",
                        spec.table
                    );
                }
            }
            ip(&spec.route_args(family, "replace")).context("adding the local delivery route")?;
            installed.undo.push(spec.route_args(family, "del"));
        }
        for family in FAMILIES {
            let rules = our_rules(spec, family)?;
            for interface in &spec.interfaces {
                let present = rules.iter().any(|rule| {
                    field(rule, "iif") == *interface && fwmark(rule) == Some((spec.mark, u32::MAX))
                });
                if !present {
                    ip(&spec.rule_args(family, interface, "add"))
                        .context("adding the local delivery rule")?;
                }
                installed
                    .undo
                    .push(spec.rule_args(family, interface, "del"));
            }
            for rule in rules {
                let iif = field(&rule, "iif");
                let wanted =
                    spec.interfaces.contains(&iif) && fwmark(&rule) == Some((spec.mark, u32::MAX));
                if wanted {
                    continue;
                }
                ip(&spec.leftover_rule_args(family, &iif))?;
                removed.push(format!("rule {rule}"));
            }
        }
        Ok((installed, removed))
    }

    /// Routes first, then the rules that lead to them; on failure whatever
    /// was added is removed again.
    pub fn install(spec: &LocalRouteSpec) -> Result<Self> {
        let mut installed = LocalRoutes { undo: Vec::new() };
        for family in FAMILIES {
            ip(&spec.route_args(family, "add")).context("adding the local delivery route")?;
            installed.undo.push(spec.route_args(family, "del"));
        }
        for interface in &spec.interfaces {
            for family in FAMILIES {
                ip(&spec.rule_args(family, interface, "add"))
                    .context("adding the local delivery rule")?;
                installed
                    .undo
                    .push(spec.rule_args(family, interface, "del"));
            }
        }
        Ok(installed)
    }
}

impl Drop for LocalRoutes {
    fn drop(&mut self) {
        if crate::sys::pins::kept_for_next_start() {
            return;
        }
        while let Some(args) = self.undo.pop() {
            if let Err(err) = ip(&args) {
                tracing::warn!("{err:#}");
            }
        }
    }
}
