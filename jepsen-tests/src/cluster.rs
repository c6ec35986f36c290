//! Keeper processes under test, one per network namespace: start, kill -9, restart, pause and
//! resume, membership changes through the etcd Cluster API, and status queries.
//!
//! A *slot* is a node's place (namespace, address, log file); its Raft id changes when the
//! member nemesis removes it and adds it back as a new member with a fresh data dir.

use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use anyhow::bail;
use etcd_client::Client;
use etcd_client::MemberAddOptions;
use nix::sys::signal::Signal;
use nix::sys::signal::kill;
use nix::unistd::Pid;

use crate::net::Network;

/// Port every keeper listens on (each has its own address).
pub const PORT: u16 = 2379;
/// Upper bound for one administrative request (status, membership, hash).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(3);

/// One node's place in the cluster.
#[derive(Debug)]
pub struct Slot {
    pub index: usize,
    /// Current Raft member id (a re-added node gets a new one).
    pub raft_id: u64,
    pub addr: String,
    /// Bumped on every fresh data dir (re-add after removal).
    pub incarnation: u32,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// Joined through `member add` (restarts use `--initial-cluster-state existing`).
    pub joined: bool,
    /// SIGSTOPped by the pause nemesis.
    pub paused: bool,
    /// Removed from the membership by the member nemesis (its process is stopped).
    pub removed: bool,
    child: Option<Child>,
}

impl Slot {
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> Option<Pid> {
        self.child.as_ref().map(|c| Pid::from_raw(c.id() as i32))
    }

    /// Running, not paused: can answer requests.
    pub fn serving(&self) -> bool {
        self.running() && !self.paused
    }
}

/// A keeper cluster in the namespaces of `net`.
pub struct Cluster {
    pub net: Arc<Network>,
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub slots: Vec<Slot>,
    initial: String,
    /// Extra flags for every keeper process (e.g. `--unsafe-stale-reads`).
    args: Vec<String>,
}

/// An etcd client bound to one address over a plain (non-balanced) lazy channel: a refused
/// connection fails at once instead of waiting for an endpoint to become ready, so the client
/// can tell "never sent" from "sent, answer lost".
pub async fn client(addr: &str) -> anyhow::Result<Client> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(Client::from_channel(etcd_client::Channel::Tonic(channel), None).await?)
}

/// `f` with a deadline; a timeout becomes an error.
pub async fn within<T, F>(limit: Duration, what: &str, f: F) -> anyhow::Result<T>
where
    F: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r.map_err(|e| anyhow::anyhow!("{what}: {e}")),
        Err(_) => bail!("{what}: timed out after {limit:?}"),
    }
}

impl Cluster {
    /// Starts one keeper per namespace of `net` as a new cluster, each with the extra flags
    /// `args`; logs and data under `dir`.
    pub fn start(
        net: Arc<Network>,
        bin: &Path,
        args: &[String],
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let n = net.nodes.len();
        Self::start_on(net, n, bin, args, dir)
    }

    /// Starts keepers in the first `n` namespaces of `net` only (the others hold the services
    /// under test).
    pub fn start_on(
        net: Arc<Network>,
        n: usize,
        bin: &Path,
        args: &[String],
        dir: &Path,
    ) -> anyhow::Result<Self> {
        if !bin.exists() {
            bail!(
                "keeper binary {} not found; build the workspace (`cargo build --workspace --all-targets`) or pass --keeper-bin",
                bin.display()
            );
        }
        let slots: Vec<Slot> = net
            .nodes
            .iter()
            .take(n)
            .enumerate()
            .map(|(i, n)| Slot {
                index: i,
                raft_id: i as u64 + 1,
                addr: format!("{}:{PORT}", n.ip),
                incarnation: 0,
                data_dir: dir.join(format!("n{}-data-0", i + 1)),
                log: dir.join(format!("keeper-n{}.log", i + 1)),
                joined: false,
                paused: false,
                removed: false,
                child: None,
            })
            .collect();
        let initial = slots
            .iter()
            .map(|s| format!("{}={}", s.raft_id, s.addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            net,
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            slots,
            initial,
            args: args.to_vec(),
        };
        for i in 0..cluster.slots.len() {
            cluster.spawn(i)?;
        }
        Ok(cluster)
    }

    pub fn addrs(&self) -> Vec<String> {
        self.slots.iter().map(|s| s.addr.clone()).collect()
    }

    /// Starts slot `i`'s keeper inside its namespace.
    pub fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let slot = &mut self.slots[i];
        if slot.child.is_some() {
            return Ok(());
        }
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--id")
            .arg(slot.raft_id.to_string())
            .arg("--listen")
            .arg(&slot.addr)
            .arg("--advertise")
            .arg(&slot.addr)
            .arg("--data-dir")
            .arg(&slot.data_dir)
            .args(&self.args);
        if slot.joined {
            cmd.args(["--initial-cluster-state", "existing"]);
        } else {
            cmd.args(["--initial-cluster", &self.initial]);
            cmd.args(["--initial-cluster-state", "new"]);
        }
        let what = format!(
            "keeper id {} (incarnation {})",
            slot.raft_id, slot.incarnation
        );
        let child = crate::net::spawn_in(
            &self.net.nodes[i].ns,
            &mut cmd,
            &slot.log,
            &what,
            "info,openraft=warn",
        )?;
        slot.child = Some(child);
        slot.paused = false;
        Ok(())
    }

    /// kill -9 slot `i` and reap it.
    pub fn kill9(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        if let Some(mut child) = slot.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        slot.paused = false;
    }

    pub fn pause(&mut self, i: usize) -> anyhow::Result<()> {
        let pid = self.slots[i].pid().context("not running")?;
        kill(pid, Signal::SIGSTOP)?;
        self.slots[i].paused = true;
        Ok(())
    }

    pub fn resume(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(pid) = self.slots[i].pid() {
            kill(pid, Signal::SIGCONT)?;
        }
        self.slots[i].paused = false;
        Ok(())
    }

    /// Slot holding Raft member `id`.
    pub fn slot_of(&self, id: u64) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.raft_id == id && !s.removed)
    }

    /// The leader as most serving nodes see it, if any.
    pub async fn leader(&self) -> Option<usize> {
        let mut votes: Vec<(u64, usize)> = Vec::new();
        for s in self.slots.iter().filter(|s| s.serving()) {
            let Ok(mut c) = client(&s.addr).await else {
                continue;
            };
            if let Ok(st) = within(Duration::from_secs(1), "status", c.status()).await {
                let l = st.leader();
                if l == 0 {
                    continue;
                }
                match votes.iter_mut().find(|(id, _)| *id == l) {
                    Some((_, n)) => *n += 1,
                    None => votes.push((l, 1)),
                }
            }
        }
        let (id, _) = votes.into_iter().max_by_key(|(_, n)| *n)?;
        self.slot_of(id)
    }

    /// Waits until a leader is agreed by every serving node.
    pub async fn wait_leader(&self, limit: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + limit;
        loop {
            let serving: Vec<&Slot> = self.slots.iter().filter(|s| s.serving()).collect();
            let mut seen = Vec::new();
            for s in &serving {
                if let Ok(mut c) = client(&s.addr).await
                    && let Ok(st) = within(Duration::from_secs(1), "status", c.status()).await
                {
                    seen.push(st.leader());
                }
            }
            if seen.len() == serving.len()
                && !seen.is_empty()
                && seen.iter().all(|l| *l == seen[0] && *l != 0)
                && let Some(slot) = self.slot_of(seen[0])
            {
                return Ok(slot);
            }
            if Instant::now() > deadline {
                bail!("no leader agreed by every running node within {limit:?} (saw {seen:?})");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs `op` against serving nodes (other than `avoid`) until one answers, the leader first
    /// (its view of the membership is the newest).
    async fn admin<T, F, Fut>(&self, avoid: Option<usize>, what: &str, op: F) -> anyhow::Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut last = anyhow::anyhow!("{what}: no node serving");
        let leader = self.leader().await;
        let mut order: Vec<&Slot> = self
            .slots
            .iter()
            .filter(|s| s.serving() && !s.removed && Some(s.index) != avoid)
            .collect();
        order.sort_by_key(|s| Some(s.index) != leader);
        for s in order {
            match client(&s.addr).await {
                Ok(c) => match within(ADMIN_TIMEOUT, what, op(c)).await {
                    Ok(v) => return Ok(v),
                    Err(e) => last = e.context(format!("via n{}", s.index + 1)),
                },
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Current members as (id, address, is_learner).
    pub async fn members(&self) -> anyhow::Result<Vec<(u64, String, bool)>> {
        let list = self
            .admin(
                None,
                "member list",
                |mut c| async move { c.member_list().await },
            )
            .await?;
        Ok(list
            .members()
            .iter()
            .map(|m| {
                let addr = m
                    .peer_urls()
                    .first()
                    .map(|u| u.trim_start_matches("http://").to_string())
                    .unwrap_or_default();
                (m.id(), addr, m.is_learner())
            })
            .collect())
    }

    /// Removes slot `i` from the membership, stops it and discards its data. Returns whether
    /// it is now removed (an unclear answer is settled by listing the members).
    pub async fn remove_member(&mut self, i: usize) -> anyhow::Result<()> {
        let id = self.slots[i].raft_id;
        let removed = self
            .admin(Some(i), "member remove", |mut c| async move {
                c.member_remove(id).await
            })
            .await;
        if let Err(e) = removed {
            let still = self
                .members()
                .await
                .map(|m| m.iter().any(|(mid, _, _)| *mid == id))
                .unwrap_or(true);
            if still {
                return Err(e);
            }
        }
        self.kill9(i);
        self.slots[i].removed = true;
        let _ = std::fs::remove_dir_all(&self.slots[i].data_dir);
        Ok(())
    }

    /// Adds removed slot `i` back as a new learner with a fresh data dir, starts it, and
    /// promotes it once it has caught up (waiting up to `promote_within`).
    pub async fn add_member(&mut self, i: usize, promote_within: Duration) -> anyhow::Result<u64> {
        let addr = self.slots[i].addr.clone();
        let url = format!("http://{addr}");
        if self.slots[i].removed {
            let added = self
                .admin(Some(i), "member add", |mut c| {
                    let url = url.clone();
                    async move {
                        c.member_add([url], Some(MemberAddOptions::new().with_is_learner()))
                            .await
                    }
                })
                .await;
            let id = match added {
                Ok(resp) => resp.member().map(|m| m.id()),
                Err(e) => {
                    // Maybe it was added and the answer lost.
                    let members = self.members().await.map_err(|_| e)?;
                    let id = members.iter().find(|(_, a, _)| *a == addr).map(|m| m.0);
                    if id.is_none() {
                        bail!("member add of {addr} failed and it is not a member");
                    }
                    id
                }
            };
            let id = id.context("member add answered without a member")?;
            let slot = &mut self.slots[i];
            slot.raft_id = id;
            slot.incarnation += 1;
            slot.data_dir = self
                .dir
                .join(format!("n{}-data-{}", i + 1, slot.incarnation));
            slot.joined = true;
            slot.removed = false;
            self.spawn(i)?;
        }
        let id = self.slots[i].raft_id;
        let deadline = Instant::now() + promote_within;
        loop {
            let members = self.members().await.unwrap_or_default();
            if members
                .iter()
                .any(|(mid, _, learner)| *mid == id && !learner)
            {
                return Ok(id);
            }
            let promoted = self
                .admin(Some(i), "member promote", |mut c| async move {
                    c.member_promote(id).await
                })
                .await;
            if promoted.is_ok() {
                return Ok(id);
            }
            if Instant::now() > deadline {
                bail!(
                    "learner {id} at {addr} not promoted within {promote_within:?}: {promoted:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// (revision, hash) reported by each serving node's HashKV.
    pub async fn hashes(&self) -> Vec<(usize, anyhow::Result<(i64, u32)>)> {
        let mut out = Vec::new();
        for s in self.slots.iter().filter(|s| s.serving()) {
            let r = async {
                let mut c = client(&s.addr).await?;
                let h = within(ADMIN_TIMEOUT, "hash kv", c.hash_kv(0)).await?;
                let rev = h.header().map(|h| h.revision()).unwrap_or_default();
                Ok((rev, h.hash()))
            }
            .await;
            out.push((s.index, r));
        }
        out
    }

    /// Kills every process (the network stays for the next run).
    pub fn stop(&mut self) {
        for i in 0..self.slots.len() {
            self.resume(i).ok();
            self.kill9(i);
        }
    }

    /// Removes the data dirs (logs stay).
    pub fn remove_data(&self) {
        for s in &self.slots {
            for inc in 0..=s.incarnation {
                let _ =
                    std::fs::remove_dir_all(self.dir.join(format!("n{}-data-{inc}", s.index + 1)));
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}
