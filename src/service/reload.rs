//! SIGHUP: a reload is a plan computed from names alone (which datapaths
//! to add, change in place, or remove), then checked and prepared whole
//! without changing what runs, then applied: new datapaths attach and
//! changes apply before the removed ones stop. A file with an error, a
//! refused change or a datapath that cannot be prepared leaves the running
//! configuration as it was.

use std::net::SocketAddr;

use anyhow::{Context as _, Result};

use crate::runtime::{DatapathSettings, RunContext, RunningDatapath};
use crate::telemetry::metrics::Metrics;
use crate::{err_out, out};

/// Where a service's settings come from, and how to read them again.
pub trait Source<S> {
    fn load(&self) -> Result<(Vec<S>, Option<SocketAddr>)>;
}

/// What a reload does, by name.
pub struct Plan<S> {
    /// Settings whose name nothing runs under yet.
    pub add: Vec<S>,
    /// New settings for a datapath that runs, applied in place.
    pub change: Vec<S>,
    /// Names that run but that the new settings no longer name.
    pub remove: Vec<String>,
}

/// Sorts the new settings against the names that run.
pub fn plan<S: DatapathSettings>(running: &[String], new: Vec<S>) -> Plan<S> {
    let names: Vec<String> = new.iter().map(S::name).collect();
    let (change, add) = new
        .into_iter()
        .partition(|settings| running.contains(&settings.name()));
    let remove = running
        .iter()
        .filter(|name| !names.contains(name))
        .cloned()
        .collect();
    Plan {
        add,
        change,
        remove,
    }
}

/// A plan whose every step was checked and whose new datapaths are
/// prepared (loaded, bound, not attached).
pub struct Prepared<S: DatapathSettings> {
    add: Vec<S::Running>,
    change: Vec<S>,
    remove: Vec<String>,
}

/// Checks every step and prepares every new datapath; changes nothing that
/// runs.
pub fn prepare<S: DatapathSettings>(
    plan: Plan<S>,
    running: &[S::Running],
    ctx: &RunContext,
) -> Result<Prepared<S>> {
    let section = |settings: &S| format!("[{}]", settings.name());
    for settings in plan.add.iter().chain(&plan.change) {
        settings.check().with_context(|| section(settings))?;
    }
    for settings in &plan.change {
        let name = settings.name();
        let current = running
            .iter()
            .find(|each| each.datapath().name() == name)
            .expect("the plan changes only what runs");
        current
            .check_reload(settings)
            .with_context(|| section(settings))?;
    }
    let mut add = Vec::new();
    for settings in &plan.add {
        add.push(settings.prepare(ctx).with_context(|| section(settings))?);
    }
    Ok(Prepared {
        add,
        change: plan.change,
        remove: plan.remove,
    })
}

/// New datapaths and changes first, so that nothing is left without a
/// datapath in between (a port-nat moving to another interface is attached
/// there before it leaves the old one); then the ones no longer named.
pub fn apply<S: DatapathSettings>(
    prepared: Prepared<S>,
    running: &mut Vec<S::Running>,
    ctx: &RunContext,
) {
    for mut each in prepared.add {
        let name = each.datapath().name();
        match each.datapath_mut().attach(ctx) {
            Ok(()) => {
                out!("Reloaded {name}");
                running.push(each);
            }
            Err(err) => err_out!("reload could not attach {name}: {err:#}"),
        }
    }
    for settings in &prepared.change {
        let name = settings.name();
        if let Some(current) = running.iter_mut().find(|d| d.datapath().name() == name) {
            match current.reload(settings, ctx) {
                Ok(()) => out!("Reloaded {name}"),
                Err(err) => err_out!("reload of {name} failed: {err:#}"),
            }
        }
    }
    running.retain_mut(|each| {
        let name = each.datapath().name();
        let keep = !prepared.remove.contains(&name);
        if !keep {
            each.datapath_mut().stop();
            out!("Stopped {name}");
        }
        keep
    });
}

/// Reads the source again and reloads from it; if anything is wrong, one
/// line says what and the running configuration stays.
pub fn reload<S: DatapathSettings>(
    ctx: &RunContext,
    running: &mut Vec<S::Running>,
    source: &dyn Source<S>,
    metrics: &mut Metrics,
) {
    let prepared = || -> Result<(Prepared<S>, Option<Metrics>)> {
        let (settings, metrics_addr) = source.load()?;
        let names: Vec<String> = running.iter().map(|d| d.datapath().name()).collect();
        let prepared = prepare(plan(&names, settings), running, ctx)?;
        let new_metrics = match metrics.addr() == metrics_addr {
            true => None,
            false => Some(Metrics::bind(metrics_addr, &ctx.inheritance).context("[metrics]")?),
        };
        Ok((prepared, new_metrics))
    };
    match prepared() {
        Ok((prepared, new_metrics)) => {
            apply(prepared, running, ctx);
            if let Some(new_metrics) = new_metrics {
                *metrics = new_metrics;
            }
        }
        Err(err) => err_out!("reload refused, the running configuration stays: {err:#}"),
    }
}

#[cfg(test)]
mod tests {
    //! The reload rules README promises, with fake datapaths: no root, no
    //! kernel.

    use std::cell::RefCell;
    use std::rc::Rc;

    use anyhow::bail;

    use super::*;
    use crate::cli::EventFormat;
    use crate::runtime::{Datapath, EventSource};
    use crate::telemetry::stats::Snapshot;

    /// What the fakes did, in order: `attach a`, `reload a v2`, `stop a`,
    /// `detach a`, ...
    type Log = Rc<RefCell<Vec<String>>>;

    #[derive(Clone)]
    struct FakeSettings {
        name: &'static str,
        version: u32,
        fails_check: bool,
        refuses_reload: bool,
        log: Log,
    }

    struct FakeDatapath {
        name: &'static str,
        version: u32,
        log: Log,
    }

    impl DatapathSettings for FakeSettings {
        type Running = FakeDatapath;

        fn name(&self) -> String {
            self.name.into()
        }

        fn check(&self) -> Result<()> {
            match self.fails_check {
                true => bail!("{} is wrong", self.name),
                false => Ok(()),
            }
        }

        fn prepare(&self, _ctx: &RunContext) -> Result<FakeDatapath> {
            self.log.borrow_mut().push(format!("prepare {}", self.name));
            Ok(FakeDatapath {
                name: self.name,
                version: self.version,
                log: self.log.clone(),
            })
        }
    }

    impl RunningDatapath for FakeDatapath {
        type Settings = FakeSettings;

        fn datapath(&self) -> &dyn Datapath {
            self
        }

        fn datapath_mut(&mut self) -> &mut dyn Datapath {
            self
        }

        fn check_reload(&self, settings: &FakeSettings) -> Result<()> {
            match settings.refuses_reload {
                true => bail!("{} cannot change that while running", self.name),
                false => Ok(()),
            }
        }

        fn reload(&mut self, settings: &FakeSettings, _ctx: &RunContext) -> Result<()> {
            self.version = settings.version;
            self.log
                .borrow_mut()
                .push(format!("reload {} v{}", self.name, self.version));
            Ok(())
        }
    }

    impl Datapath for FakeDatapath {
        fn name(&self) -> String {
            self.name.into()
        }
        fn attach(&mut self, _ctx: &RunContext) -> Result<()> {
            self.log.borrow_mut().push(format!("attach {}", self.name));
            Ok(())
        }
        fn attach_mode(&self) -> String {
            "fake".into()
        }
        fn events(&self, _ctx: &RunContext) -> Result<Option<EventSource>> {
            Ok(None)
        }
        fn snapshots(&self) -> Result<Vec<Snapshot>> {
            Ok(Vec::new())
        }
        fn status(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
        fn stop(&mut self) {
            self.log.borrow_mut().push(format!("stop {}", self.name));
        }
        fn print_statistics(&self) -> Result<()> {
            Ok(())
        }
    }

    impl Drop for FakeDatapath {
        fn drop(&mut self) {
            self.log.borrow_mut().push(format!("detach {}", self.name));
        }
    }

    /// A config file: its datapaths, or the error reading it gives.
    struct FakeFile(Result<Vec<FakeSettings>, String>);

    impl Source<FakeSettings> for FakeFile {
        fn load(&self) -> Result<(Vec<FakeSettings>, Option<SocketAddr>)> {
            match &self.0 {
                Ok(settings) => Ok((settings.clone(), None)),
                Err(err) => bail!("{err}"),
            }
        }
    }

    struct Service {
        log: Log,
        ctx: RunContext,
        running: Vec<FakeDatapath>,
        metrics: Metrics,
    }

    impl Service {
        /// A service running these datapaths, with an empty log.
        fn running(names: &[&'static str]) -> Service {
            let log = Log::default();
            let ctx = RunContext::new(EventFormat::Off);
            let running = names
                .iter()
                .map(|name| {
                    let mut datapath = settings(&log, name).prepare(&ctx).unwrap();
                    datapath.attach(&ctx).unwrap();
                    datapath
                })
                .collect();
            log.borrow_mut().clear();
            let metrics = Metrics::bind(None, &Default::default()).unwrap();
            Service {
                log,
                ctx,
                running,
                metrics,
            }
        }

        fn reload(&mut self, file: FakeFile) {
            reload(&self.ctx, &mut self.running, &file, &mut self.metrics);
        }

        fn names(&self) -> Vec<String> {
            self.running.iter().map(Datapath::name).collect()
        }

        fn log(&self) -> Vec<String> {
            self.log.borrow().clone()
        }

        /// Where `entry` stands in the log.
        fn when(&self, entry: &str) -> usize {
            let log = self.log();
            log.iter()
                .position(|each| each == entry)
                .unwrap_or_else(|| panic!("no '{entry}' in {log:?}"))
        }
    }

    fn settings(log: &Log, name: &'static str) -> FakeSettings {
        FakeSettings {
            name,
            version: 1,
            fails_check: false,
            refuses_reload: false,
            log: log.clone(),
        }
    }

    #[test]
    fn the_plan_sorts_names_into_add_change_and_remove() {
        let log = Log::default();
        let running = vec!["redirect".to_owned(), "port-nat eth0".to_owned()];
        let new = vec![settings(&log, "redirect"), settings(&log, "port-nat eth1")];
        let plan = plan(&running, new);
        let names = |list: &[FakeSettings]| list.iter().map(|s| s.name).collect::<Vec<_>>();
        assert_eq!(names(&plan.add), ["port-nat eth1"]);
        assert_eq!(names(&plan.change), ["redirect"]);
        assert_eq!(plan.remove, ["port-nat eth0"]);
    }

    #[test]
    fn a_file_with_an_error_changes_nothing() {
        let mut service = Service::running(&["redirect", "bypass"]);
        service.reload(FakeFile(Err("line 3, column 1: invalid key".into())));
        assert_eq!(service.log(), Vec::<String>::new());
        assert_eq!(service.names(), ["redirect", "bypass"]);
    }

    #[test]
    fn new_datapaths_attach_before_removed_ones_stop() {
        // A port-nat moving from eth0 to eth1.
        let mut service = Service::running(&["port-nat eth0"]);
        let log = service.log.clone();
        service.reload(FakeFile(Ok(vec![settings(&log, "port-nat eth1")])));
        assert!(service.when("attach port-nat eth1") < service.when("stop port-nat eth0"));
        assert!(service.when("stop port-nat eth0") < service.when("detach port-nat eth0"));
        assert_eq!(service.names(), ["port-nat eth1"]);
    }

    #[test]
    fn a_change_is_applied_in_place_before_removed_ones_stop() {
        let mut service = Service::running(&["redirect", "bypass"]);
        let log = service.log.clone();
        let changed = FakeSettings {
            version: 2,
            ..settings(&log, "redirect")
        };
        service.reload(FakeFile(Ok(vec![changed])));
        assert!(service.when("reload redirect v2") < service.when("stop bypass"));
        assert!(!service.log().contains(&"detach redirect".to_owned()));
        assert_eq!(service.names(), ["redirect"]);
    }

    #[test]
    fn a_refused_change_refuses_the_whole_reload() {
        let mut service = Service::running(&["redirect", "bypass"]);
        let log = service.log.clone();
        let refused = FakeSettings {
            refuses_reload: true,
            ..settings(&log, "bypass")
        };
        let changed = FakeSettings {
            version: 2,
            ..settings(&log, "redirect")
        };
        let added = settings(&log, "tproxy");
        service.reload(FakeFile(Ok(vec![changed, refused, added])));
        let log = service.log();
        assert!(
            !log.iter()
                .any(|each| each.starts_with("attach") || each.starts_with("reload")),
            "{log:?}"
        );
        assert_eq!(service.names(), ["redirect", "bypass"]);
    }

    #[test]
    fn a_datapath_that_fails_its_check_refuses_the_whole_reload() {
        let mut service = Service::running(&["redirect"]);
        let log = service.log.clone();
        let changed = FakeSettings {
            version: 2,
            ..settings(&log, "redirect")
        };
        let wrong = FakeSettings {
            fails_check: true,
            ..settings(&log, "port-nat eth0")
        };
        service.reload(FakeFile(Ok(vec![changed, wrong])));
        assert_eq!(service.log(), Vec::<String>::new());
        assert_eq!(service.names(), ["redirect"]);
    }
}
