//! The nemesis: injects faults into the cluster on a schedule (one action every 5-10 s: start
//! a fault, or heal one that is active, so faults overlap and combine) and heals everything at
//! the end. Every action is recorded in the history and in `nemesis.log`.

use std::time::Duration;

use rand::Rng;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::history::Recorder;

/// The kinds of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Network partitions: random halves, the leader isolated in a minority, or one-way.
    Partition,
    /// kill -9 of one node, the leader, or every node; healed by restarting them.
    Kill,
    /// SIGSTOP of one node or the leader; healed by SIGCONT.
    Pause,
    /// Remove a member through the Cluster API; healed by adding it back (learner, then
    /// promote) with a fresh data dir.
    Member,
}

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::Partition => "partition",
            Fault::Kill => "kill",
            Fault::Pause => "pause",
            Fault::Member => "member",
        }
    }

    /// Parses `partition,kill,pause,member`, `all`, or `none`.
    pub fn parse_list(s: &str) -> Result<Vec<Fault>, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "all" => out.extend([Fault::Partition, Fault::Kill, Fault::Pause, Fault::Member]),
                "none" => {}
                "partition" => out.push(Fault::Partition),
                "kill" => out.push(Fault::Kill),
                "pause" => out.push(Fault::Pause),
                "member" => out.push(Fault::Member),
                other => {
                    return Err(format!(
                        "unknown nemesis `{other}`: use partition, kill, pause, member, all or none"
                    ));
                }
            }
        }
        out.dedup();
        Ok(out)
    }
}

/// Schedule settings.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub faults: Vec<Fault>,
    /// Range of the pause between two nemesis actions.
    pub interval: (Duration, Duration),
    pub seed: u64,
}

impl Schedule {
    /// This schedule with the seed of one run.
    pub fn with_seed(&self, seed: u64) -> Schedule {
        Schedule {
            seed,
            ..self.clone()
        }
    }

    /// Waits one random interval; false once `stop` fires (at once a schedule without faults
    /// just waits for it).
    pub async fn pace(&self, rng: &mut StdRng, stop: &CancellationToken) -> bool {
        if self.faults.is_empty() {
            stop.cancelled().await;
            return false;
        }
        let (lo, hi) = self.interval;
        let wait = if hi > lo {
            rng.random_range(lo..=hi)
        } else {
            lo
        };
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }
}

/// One scheduled nemesis action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Heal(Fault),
    Start(Fault),
}

/// Picks the next action: heal an active fault (half the time, always when none is inactive)
/// or start an inactive one, so faults overlap and combine. `None` without any fault.
pub fn choose(rng: &mut StdRng, active: &[Fault], inactive: &[Fault]) -> Option<Action> {
    let heal = !active.is_empty() && (inactive.is_empty() || rng.random_bool(0.5));
    if heal {
        Some(Action::Heal(active[rng.random_range(0..active.len())]))
    } else if inactive.is_empty() {
        None
    } else {
        Some(Action::Start(inactive[rng.random_range(0..inactive.len())]))
    }
}

/// Records the outcome of starting fault `f` (`detail` or the error), counting it in `started`.
pub fn record_start(rec: &Recorder, f: Fault, result: anyhow::Result<String>, started: &mut usize) {
    match result {
        Ok(detail) => {
            *started += 1;
            rec.nemesis(f.name(), "start", detail);
        }
        Err(e) => rec.nemesis(f.name(), "error", format!("{e:#}")),
    }
}

/// Cancels the returned token after `time`, or as soon as `cancel` fires: how long the
/// nemesis of a run acts.
pub fn stop_after(time: Duration, cancel: &CancellationToken) -> CancellationToken {
    let stop = CancellationToken::new();
    let (token, cancel) = (stop.clone(), cancel.clone());
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::time::sleep(time) => {}
            _ = cancel.cancelled() => {}
        }
        token.cancel();
    });
    stop
}

/// The nemesis's view of what it broke.
#[derive(Debug, Default)]
struct Active {
    partition: bool,
    killed: Vec<usize>,
    paused: Vec<usize>,
    removed: Option<usize>,
}

pub struct Nemesis {
    pub cluster: Cluster,
    rec: Recorder,
    schedule: Schedule,
    rng: StdRng,
    active: Active,
    /// Faults started (for the summary).
    pub faults_started: usize,
}

/// Slot numbers as people read them (`n1`, `n2`...).
fn names(slots: &[usize]) -> String {
    let v: Vec<String> = slots.iter().map(|i| format!("n{}", i + 1)).collect();
    format!("[{}]", v.join(" "))
}

impl Nemesis {
    pub fn new(cluster: Cluster, rec: Recorder, schedule: Schedule) -> Self {
        let rng = StdRng::seed_from_u64(schedule.seed);
        Self {
            cluster,
            rec,
            schedule,
            rng,
            active: Active::default(),
            faults_started: 0,
        }
    }

    /// Acts every interval until `stop`, then returns (faults stay active: call
    /// [`Nemesis::heal_all`]).
    pub async fn run(&mut self, stop: CancellationToken) {
        while self.schedule.pace(&mut self.rng, &stop).await {
            self.tick().await;
        }
    }

    fn is_active(&self, f: Fault) -> bool {
        match f {
            Fault::Partition => self.active.partition,
            Fault::Kill => !self.active.killed.is_empty(),
            Fault::Pause => !self.active.paused.is_empty(),
            Fault::Member => self.active.removed.is_some(),
        }
    }

    /// One scheduled action: heal an active fault or start an inactive one.
    async fn tick(&mut self) {
        let (active, inactive): (Vec<Fault>, Vec<Fault>) = self
            .schedule
            .faults
            .iter()
            .copied()
            .partition(|f| self.is_active(*f));
        match choose(&mut self.rng, &active, &inactive) {
            Some(Action::Heal(f)) => self.heal(f).await,
            Some(Action::Start(f)) => self.start(f).await,
            None => {}
        }
    }

    fn candidates(&self) -> Vec<usize> {
        self.cluster
            .slots
            .iter()
            .filter(|s| s.serving() && !s.removed)
            .map(|s| s.index)
            .collect()
    }

    async fn start(&mut self, f: Fault) {
        let result = match f {
            Fault::Partition => self.partition().await,
            Fault::Kill => self.kill().await,
            Fault::Pause => self.pause().await,
            Fault::Member => self.remove_member().await,
        };
        record_start(&self.rec, f, result, &mut self.faults_started);
    }

    async fn partition(&mut self) -> anyhow::Result<String> {
        let n = self.cluster.slots.len();
        let mut all: Vec<usize> = (0..n).collect();
        all.shuffle(&mut self.rng);
        let minority_size = (n / 2).max(1);
        let variant = self.rng.random_range(0..3);
        let (minority, majority, kind) = match variant {
            0 => {
                let (a, b) = all.split_at(minority_size);
                (a.to_vec(), b.to_vec(), "random halves")
            }
            1 => {
                let leader = self.cluster.leader().await.unwrap_or(all[0]);
                let mut minority = vec![leader];
                minority.extend(all.iter().filter(|i| **i != leader).take(minority_size - 1));
                let majority = all
                    .iter()
                    .filter(|i| !minority.contains(i))
                    .copied()
                    .collect();
                (minority, majority, "leader isolated in a minority")
            }
            _ => {
                let (a, b) = all.split_at(minority_size);
                (a.to_vec(), b.to_vec(), "one-way")
            }
        };
        for &dst in &majority {
            for &src in &minority {
                self.cluster.net.drop_from(dst, src)?;
            }
        }
        let detail = if variant == 2 {
            format!(
                "{kind}: {} cannot reach {} (replies still flow)",
                names(&minority),
                names(&majority)
            )
        } else {
            for &dst in &minority {
                for &src in &majority {
                    self.cluster.net.drop_from(dst, src)?;
                }
            }
            format!("{kind}: {} | {}", names(&minority), names(&majority))
        };
        self.active.partition = true;
        Ok(detail)
    }

    async fn kill(&mut self) -> anyhow::Result<String> {
        let candidates: Vec<usize> = self
            .cluster
            .slots
            .iter()
            .filter(|s| s.running() && !s.removed)
            .map(|s| s.index)
            .collect();
        if candidates.is_empty() {
            anyhow::bail!("no running node to kill");
        }
        let roll: f64 = self.rng.random();
        let (victims, kind) = if roll < 0.1 {
            (candidates.clone(), "every node")
        } else if roll < 0.4 {
            match self.cluster.leader().await {
                Some(l) if candidates.contains(&l) => (vec![l], "the leader"),
                _ => (vec![candidates[0]], "a node (no leader known)"),
            }
        } else {
            let i = self.rng.random_range(0..candidates.len());
            (vec![candidates[i]], "a random node")
        };
        for &v in &victims {
            self.cluster.kill9(v);
            self.active.paused.retain(|p| *p != v);
            self.active.killed.push(v);
        }
        Ok(format!("kill -9 {kind}: {}", names(&victims)))
    }

    async fn pause(&mut self) -> anyhow::Result<String> {
        let candidates = self.candidates();
        if candidates.is_empty() {
            anyhow::bail!("no serving node to pause");
        }
        let (victim, kind) = if self.rng.random_bool(0.5) {
            match self.cluster.leader().await {
                Some(l) if candidates.contains(&l) => (l, "the leader"),
                _ => (candidates[0], "a node (no leader known)"),
            }
        } else {
            (
                candidates[self.rng.random_range(0..candidates.len())],
                "a random node",
            )
        };
        self.cluster.pause(victim)?;
        self.active.paused.push(victim);
        Ok(format!("SIGSTOP {kind}: {}", names(&[victim])))
    }

    async fn remove_member(&mut self) -> anyhow::Result<String> {
        let members: Vec<usize> = self
            .cluster
            .slots
            .iter()
            .filter(|s| !s.removed)
            .map(|s| s.index)
            .collect();
        if members.len() < 3 {
            anyhow::bail!("only {} members left; not removing another", members.len());
        }
        let victim = members[self.rng.random_range(0..members.len())];
        let id = self.cluster.slots[victim].raft_id;
        self.cluster.remove_member(victim).await?;
        self.active.killed.retain(|k| *k != victim);
        self.active.paused.retain(|p| *p != victim);
        self.active.removed = Some(victim);
        Ok(format!(
            "MemberRemove {} (raft id {id}); process stopped, data discarded",
            names(&[victim])
        ))
    }

    async fn heal(&mut self, f: Fault) {
        let result: anyhow::Result<String> = match f {
            Fault::Partition => self.cluster.net.heal().map(|_| {
                self.active.partition = false;
                "iptables rules flushed on every node".to_string()
            }),
            Fault::Kill => {
                let killed = std::mem::take(&mut self.active.killed);
                let mut res = Ok(format!("restarted {}", names(&killed)));
                for &k in &killed {
                    if let Err(e) = self.cluster.spawn(k) {
                        res = Err(e);
                    }
                }
                res
            }
            Fault::Pause => {
                let paused = std::mem::take(&mut self.active.paused);
                let mut res = Ok(format!("SIGCONT {}", names(&paused)));
                for &p in &paused {
                    if let Err(e) = self.cluster.resume(p) {
                        res = Err(e);
                    }
                }
                res
            }
            Fault::Member => match self.active.removed {
                Some(slot) => match self.cluster.add_member(slot, Duration::from_secs(20)).await {
                    Ok(id) => {
                        self.active.removed = None;
                        Ok(format!(
                            "MemberAdd (learner) + MemberPromote {} as raft id {id}",
                            names(&[slot])
                        ))
                    }
                    Err(e) => {
                        // Whatever state the slot is in, the final heal finishes the job.
                        if !self.cluster.slots[slot].removed {
                            self.active.removed = None;
                        }
                        Err(e)
                    }
                },
                None => Ok("nothing to add back".into()),
            },
        };
        match result {
            Ok(detail) => self.rec.nemesis(f.name(), "heal", detail),
            Err(e) => self.rec.nemesis(f.name(), "error", format!("heal: {e:#}")),
        }
    }

    /// Heals network and processes: SIGCONT, flush partitions, restart killed nodes. The
    /// cluster then has every node it had, minus a removed member (see
    /// [`Nemesis::heal_membership`]).
    pub async fn heal_processes(&mut self) -> anyhow::Result<()> {
        for i in 0..self.cluster.slots.len() {
            self.cluster.resume(i)?;
        }
        self.active.paused.clear();
        self.cluster.net.heal()?;
        self.active.partition = false;
        for i in 0..self.cluster.slots.len() {
            if !self.cluster.slots[i].removed {
                self.cluster.spawn(i)?;
            }
        }
        self.active.killed.clear();
        self.rec.nemesis(
            "heal-all",
            "heal",
            "SIGCONT every node, partitions flushed, every member running",
        );
        Ok(())
    }

    /// Adds back removed members and promotes learners, so every slot is a voter again.
    pub async fn heal_membership(&mut self, limit: Duration) -> anyhow::Result<()> {
        for i in 0..self.cluster.slots.len() {
            let members = self.cluster.members().await?;
            let id = self.cluster.slots[i].raft_id;
            let voter = !self.cluster.slots[i].removed
                && members.iter().any(|(m, _, learner)| *m == id && !learner);
            if !voter {
                if !members.iter().any(|(m, _, _)| *m == id) && !self.cluster.slots[i].removed {
                    // Removed although the answer said otherwise: start it over as a new member.
                    self.cluster.kill9(i);
                    self.cluster.slots[i].removed = true;
                    let _ = std::fs::remove_dir_all(&self.cluster.slots[i].data_dir);
                }
                let id = self.cluster.add_member(i, limit).await?;
                self.rec.nemesis(
                    "member",
                    "heal",
                    format!("n{} is a voter again as raft id {id}", i + 1),
                );
            }
        }
        self.active.removed = None;
        Ok(())
    }
}
