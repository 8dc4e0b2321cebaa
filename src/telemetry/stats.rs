//! Counters and gauges as named data. A datapath reports a [`Snapshot`];
//! the exit statistics, the JSON summary and the Prometheus `/metrics` page
//! all read the same values.

use crate::out;
use std::collections::BTreeMap;
use std::fmt::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only ever grows while the datapath runs.
    Counter,
    /// Goes up and down: open connections, map occupancy.
    Gauge,
}

#[derive(Debug, Clone)]
pub struct Metric {
    /// snake_case, unique within the datapath with the same labels
    pub name: &'static str,
    /// what the statistics print before the value
    pub label: String,
    pub help: &'static str,
    pub kind: Kind,
    pub value: u64,
    /// e.g. `("reason", "no proxy")` for one of several counters of a kind
    pub labels: Vec<(&'static str, String)>,
}

impl Metric {
    pub fn counter(
        name: &'static str,
        label: impl Into<String>,
        help: &'static str,
        value: u64,
    ) -> Metric {
        Metric {
            name,
            label: label.into(),
            help,
            kind: Kind::Counter,
            value,
            labels: Vec::new(),
        }
    }

    pub fn gauge(
        name: &'static str,
        label: impl Into<String>,
        help: &'static str,
        value: u64,
    ) -> Metric {
        Metric {
            kind: Kind::Gauge,
            ..Metric::counter(name, label, help, value)
        }
    }

    pub fn with_label(mut self, key: &'static str, value: impl Into<String>) -> Metric {
        self.labels.push((key, value.into()));
        self
    }
}

/// What one datapath reports at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// `redirect`, `bypass`, `port_nat`, `tproxy` or `proxy`
    pub datapath: &'static str,
    /// labels every metric of this instance carries (`interface` for
    /// port-nat, which can run more than once)
    pub instance: Vec<(&'static str, String)>,
    pub metrics: Vec<Metric>,
}

impl Snapshot {
    pub fn new(datapath: &'static str) -> Snapshot {
        Snapshot {
            datapath,
            ..Snapshot::default()
        }
    }

    pub fn push(&mut self, metric: Metric) {
        self.metrics.push(metric);
    }

    /// One counter per `(name, label, help, value)` row.
    pub fn push_counters(
        &mut self,
        rows: impl IntoIterator<Item = (&'static str, &'static str, &'static str, u64)>,
    ) {
        for (name, label, help, value) in rows {
            self.push(Metric::counter(name, label, help, value));
        }
    }

    /// One counter per `(name, label, help, counter)` row of a user-space
    /// relay's atomic counters.
    pub fn push_atomic_counters<'a>(
        &mut self,
        rows: impl IntoIterator<
            Item = (
                &'static str,
                &'static str,
                &'static str,
                &'a std::sync::atomic::AtomicU64,
            ),
        >,
    ) {
        let load = |counter: &std::sync::atomic::AtomicU64| {
            counter.load(std::sync::atomic::Ordering::Relaxed)
        };
        self.push_counters(
            rows.into_iter()
                .map(|(name, label, help, counter)| (name, label, help, load(counter))),
        );
    }

    /// The value of the metric called `name` (the first, if labelled).
    pub fn get(&self, name: &str) -> Option<u64> {
        self.metrics
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.value)
    }

    /// The statistics block: one aligned `label: value` line per metric;
    /// a labelled metric (one of a breakdown) only when it is not zero.
    pub fn print(&self) {
        let width = self
            .metrics
            .iter()
            .map(|m| m.label.len())
            .max()
            .unwrap_or(0)
            + 2;
        for metric in &self.metrics {
            if !metric.labels.is_empty() && metric.value == 0 {
                continue;
            }
            out!("  {:<width$}{}", format!("{}:", metric.label), metric.value);
        }
    }

    /// `{"datapath": ..., "<name>[_<label value>]": value, ...}`
    pub fn to_json(&self) -> serde_json::Value {
        let mut object = serde_json::Map::new();
        object.insert("datapath".into(), self.datapath.into());
        for (key, value) in &self.instance {
            object.insert((*key).into(), value.clone().into());
        }
        for metric in &self.metrics {
            let mut key = metric.name.to_owned();
            for (_, value) in &metric.labels {
                key.push('_');
                key.push_str(&value.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
            }
            object.insert(key, metric.value.into());
        }
        serde_json::Value::Object(object)
    }
}

/// The Prometheus text exposition format (version 0.0.4) of `snapshots`,
/// with a `proxy_redirect_build_info` gauge carrying `build_info` labels.
pub fn prometheus_text(snapshots: &[Snapshot], build_info: &[(&str, String)]) -> String {
    struct Family {
        help: &'static str,
        kind: Kind,
        samples: Vec<(String, u64)>,
    }
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for snapshot in snapshots {
        for metric in &snapshot.metrics {
            let mut name = format!("proxy_redirect_{}_{}", snapshot.datapath, metric.name);
            if metric.kind == Kind::Counter {
                name.push_str("_total");
            }
            let labels: Vec<(&str, &str)> = snapshot
                .instance
                .iter()
                .chain(&metric.labels)
                .map(|(k, v)| (*k, v.as_str()))
                .collect();
            families
                .entry(name)
                .or_insert(Family {
                    help: metric.help,
                    kind: metric.kind,
                    samples: Vec::new(),
                })
                .samples
                .push((label_set(&labels), metric.value));
        }
    }
    let mut text = String::new();
    let info: Vec<(&str, &str)> = build_info.iter().map(|(k, v)| (*k, v.as_str())).collect();
    text.push_str("# HELP proxy_redirect_build_info The running proxy-redirect: version, kernel, attach modes.\n");
    text.push_str("# TYPE proxy_redirect_build_info gauge\n");
    let _ = writeln!(text, "proxy_redirect_build_info{} 1", label_set(&info));
    for (name, family) in families {
        let kind = match family.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(text, "# HELP {name} {}", family.help);
        let _ = writeln!(text, "# TYPE {name} {kind}");
        for (labels, value) in family.samples {
            let _ = writeln!(text, "{name}{labels} {value}");
        }
    }
    text
}

fn label_set(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            let escaped = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{escaped}\"")
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_named_typed_and_labelled_once() {
        let mut redirect = Snapshot::new("redirect");
        redirect.push(Metric::counter(
            "redirected",
            "redirected",
            "Connections redirected.",
            3,
        ));
        redirect.push(
            Metric::counter(
                "bypassed",
                "no proxy",
                "Connections left alone, by reason.",
                1,
            )
            .with_label("reason", "no proxy"),
        );
        redirect.push(
            Metric::counter(
                "bypassed",
                "loopback",
                "Connections left alone, by reason.",
                2,
            )
            .with_label("reason", "loop\"back"),
        );
        redirect.push(Metric::gauge(
            "pending",
            "pending",
            "Records awaiting accept.",
            0,
        ));
        let mut nat = Snapshot::new("port_nat");
        nat.instance.push(("interface", "eth0".into()));
        nat.push(Metric::counter("packets", "packets", "Packets seen.", 7));
        let text = prometheus_text(&[redirect, nat], &[("version", "0.1.0".into())]);
        assert!(text.starts_with("# HELP proxy_redirect_build_info "));
        assert!(text.contains("proxy_redirect_build_info{version=\"0.1.0\"} 1\n"));
        assert!(text.contains("# TYPE proxy_redirect_redirect_redirected_total counter\n"));
        assert!(text.contains("proxy_redirect_redirect_redirected_total 3\n"));
        assert_eq!(
            text.matches("# TYPE proxy_redirect_redirect_bypassed_total")
                .count(),
            1
        );
        assert!(
            text.contains("proxy_redirect_redirect_bypassed_total{reason=\"loop\\\"back\"} 2\n")
        );
        assert!(text.contains("# TYPE proxy_redirect_redirect_pending gauge\n"));
        assert!(text.contains("proxy_redirect_port_nat_packets_total{interface=\"eth0\"} 7\n"));
    }

    #[test]
    fn json_keys_carry_label_values() {
        let mut snapshot = Snapshot::new("redirect");
        snapshot
            .push(Metric::counter("bypassed", "no proxy", "", 1).with_label("reason", "no proxy"));
        let json = snapshot.to_json();
        assert_eq!(json["datapath"], "redirect");
        assert_eq!(json["bypassed_no_proxy"], 1);
    }
}
