//! The nemesis of the register and push workloads: faults on service processes (register, room)
//! rather than on the keeper, on the same schedule as [`crate::nemesis`] (one action every
//! interval: heal an active fault or start an inactive one). Every detail starts with the
//! target's name, so checkers can tell which process a fault touched.

use rand::Rng;
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::history::Recorder;
use crate::nemesis::Action;
use crate::nemesis::Fault;
use crate::nemesis::Schedule;
use crate::nemesis::choose;
use crate::nemesis::record_start;
use crate::nemesis::stop_after;
use crate::net::Network;
use crate::svc::Role;
use crate::svc::Svc;

/// Services under faults, and what is broken now.
pub struct SvcNemesis {
    pub svcs: Vec<Svc>,
    pub net: Arc<Network>,
    /// Namespaces of the keeper nodes (a "cut from keeper" partition drops traffic with these).
    pub keeper_nodes: Vec<usize>,
    /// Roles the nemesis may hit.
    targets: Vec<Role>,
    rec: Recorder,
    schedule: Schedule,
    rng: StdRng,
    killed: Vec<usize>,
    paused: Vec<usize>,
    partitioned: Option<usize>,
    /// Faults started (for the summary).
    pub faults_started: usize,
}

impl SvcNemesis {
    pub fn new(
        svcs: Vec<Svc>,
        net: Arc<Network>,
        keeper_nodes: Vec<usize>,
        targets: Vec<Role>,
        rec: Recorder,
        schedule: Schedule,
    ) -> Self {
        let rng = StdRng::seed_from_u64(schedule.seed ^ 0x5eed);
        Self {
            svcs,
            net,
            keeper_nodes,
            targets,
            rec,
            schedule,
            rng,
            killed: Vec::new(),
            paused: Vec::new(),
            partitioned: None,
            faults_started: 0,
        }
    }

    /// The service named `name`.
    pub fn svc(&self, name: &str) -> Option<&Svc> {
        self.svcs.iter().find(|s| s.name == name)
    }

    /// Acts every interval until `stop`; faults stay active (call [`SvcNemesis::heal_all`]).
    pub async fn run(&mut self, stop: CancellationToken) {
        while self.schedule.pace(&mut self.rng, &stop).await {
            self.tick();
        }
    }

    /// Whether a fault of kind `f` is in force now.
    fn is_active(&self, f: Fault) -> bool {
        match f {
            Fault::Kill => !self.killed.is_empty(),
            Fault::Pause => !self.paused.is_empty(),
            Fault::Partition => self.partitioned.is_some(),
            Fault::Member => false,
        }
    }

    /// One scheduled action (membership faults are keeper-only and skipped).
    fn tick(&mut self) {
        let (active, inactive): (Vec<Fault>, Vec<Fault>) = self
            .schedule
            .faults
            .iter()
            .copied()
            .filter(|f| *f != Fault::Member)
            .partition(|f| self.is_active(*f));
        match choose(&mut self.rng, &active, &inactive) {
            Some(Action::Heal(f)) => self.heal(f),
            Some(Action::Start(f)) => {
                let result = self.start(f);
                record_start(&self.rec, f, result, &mut self.faults_started);
            }
            None => {}
        }
    }

    /// A random running, unpaused, unpartitioned target.
    fn victim(&mut self) -> anyhow::Result<usize> {
        let candidates: Vec<usize> = (0..self.svcs.len())
            .filter(|i| {
                let s = &self.svcs[*i];
                self.targets.contains(&s.role)
                    && s.running()
                    && !s.paused
                    && self.partitioned != Some(*i)
            })
            .collect();
        anyhow::ensure!(!candidates.is_empty(), "no target left to fault");
        Ok(candidates[self.rng.random_range(0..candidates.len())])
    }

    fn start(&mut self, f: Fault) -> anyhow::Result<String> {
        let v = self.victim()?;
        let name = self.svcs[v].name.clone();
        match f {
            Fault::Kill => {
                self.svcs[v].kill9();
                self.killed.push(v);
                Ok(format!("{name}: kill -9"))
            }
            Fault::Pause => {
                self.svcs[v].pause()?;
                self.paused.push(v);
                Ok(format!("{name}: SIGSTOP"))
            }
            Fault::Partition => {
                let detail = self.partition(v)?;
                self.partitioned = Some(v);
                Ok(format!("{name}: {detail}"))
            }
            Fault::Member => anyhow::bail!("member changes are keeper-only"),
        }
    }

    /// Cuts `v` off from the keeper (it stays reachable from everything else: a stale owner
    /// still answers), or isolates it from every node and the harness.
    fn partition(&mut self, v: usize) -> anyhow::Result<String> {
        let node = self.svcs[v].node;
        let others: Vec<usize> = if self.rng.random_bool(0.5) {
            self.keeper_nodes.clone()
        } else {
            (0..self.net.nodes.len()).filter(|n| *n != node).collect()
        };
        let isolated = others.len() + 1 == self.net.nodes.len();
        for &o in &others {
            self.net.drop_from(node, o)?;
            self.net.drop_from(o, node)?;
        }
        if isolated {
            self.net.drop_from_host(node)?;
            Ok("isolated from every node and the harness".into())
        } else {
            Ok(crate::checker::push::KEEPER_CUT.into())
        }
    }

    fn heal(&mut self, f: Fault) {
        let result: anyhow::Result<String> = match f {
            Fault::Kill => {
                let killed = std::mem::take(&mut self.killed);
                let mut names = Vec::new();
                let mut res = Ok(());
                for k in killed {
                    names.push(self.svcs[k].name.clone());
                    if let Err(e) = self.svcs[k].spawn(&self.net) {
                        res = Err(e);
                    }
                }
                res.map(|_| format!("{}: restarted", names.join(" ")))
            }
            Fault::Pause => {
                let paused = std::mem::take(&mut self.paused);
                let mut names = Vec::new();
                let mut res = Ok(());
                for p in paused {
                    names.push(self.svcs[p].name.clone());
                    if let Err(e) = self.svcs[p].resume() {
                        res = Err(e);
                    }
                }
                res.map(|_| format!("{}: SIGCONT", names.join(" ")))
            }
            Fault::Partition => {
                let name = self
                    .partitioned
                    .take()
                    .map(|p| self.svcs[p].name.clone())
                    .unwrap_or_default();
                self.net
                    .heal()
                    .map(|_| format!("{name}: iptables rules flushed"))
            }
            Fault::Member => Ok("nothing to heal".into()),
        };
        match result {
            Ok(detail) => self.rec.nemesis(f.name(), "heal", detail),
            Err(e) => self.rec.nemesis(f.name(), "error", format!("heal: {e:#}")),
        }
    }

    /// Acts for `time` (less if `cancel` fires) while `tasks` (the workload's `what`) run, then
    /// stops them through `stop` and heals everything. Interrupted: stops every service and
    /// fails.
    pub async fn run_then_heal<T>(
        &mut self,
        time: Duration,
        cancel: &CancellationToken,
        stop: &CancellationToken,
        tasks: Vec<JoinHandle<T>>,
        what: &str,
    ) -> anyhow::Result<()> {
        self.run(stop_after(time, cancel)).await;
        self.rec
            .nemesis("phase", "info", format!("time is up: stopping {what}"));
        stop.cancel();
        for t in tasks {
            let _ = t.await;
        }
        if cancel.is_cancelled() {
            self.stop();
            anyhow::bail!("interrupted");
        }
        self.heal_all()
    }

    /// SIGCONT everything, flush partitions, restart whatever is not running.
    pub fn heal_all(&mut self) -> anyhow::Result<()> {
        for s in &mut self.svcs {
            s.resume()?;
        }
        self.paused.clear();
        self.net.heal()?;
        self.partitioned = None;
        for s in &mut self.svcs {
            if s.exited().is_some() {
                self.rec
                    .nemesis("phase", "error", format!("{}: exited on its own", s.name));
            }
            s.spawn(&self.net)?;
        }
        self.killed.clear();
        self.rec.nemesis(
            "heal-all",
            "heal",
            "SIGCONT every process, partitions flushed, every process running",
        );
        Ok(())
    }

    /// Kills every service process.
    pub fn stop(&mut self) {
        for s in &mut self.svcs {
            let _ = s.resume();
            s.kill9();
        }
    }
}
