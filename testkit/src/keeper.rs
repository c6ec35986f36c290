//! A keeper cluster of real `keeper` processes on loopback, for integration tests.

use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use etcd_client::Client;
use etcd_client::ConnectOptions;
use tempfile::TempDir;

use crate::process::Process;
use crate::process::free_port;
use crate::process::wait_until;

/// One keeper node: its address, files and (when running) its process.
pub struct KeeperNode {
    pub id: u64,
    pub addr: String,
    pub config: PathBuf,
    pub process: Option<Process>,
}

/// N keeper processes forming one cluster. Processes are killed when this is dropped.
pub struct KeeperCluster {
    pub dir: TempDir,
    bin: PathBuf,
    pub nodes: Vec<KeeperNode>,
    /// Extra TOML lines appended to every node's config (timings, snapshot policy...).
    extra: String,
}

impl KeeperCluster {
    /// Starts `n` nodes with ids 1..=n and waits until they have elected a leader.
    pub async fn start(bin: &Path, n: u64, extra: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("keeper-cluster")
            .tempdir()?;
        let members: Vec<(u64, String)> = (1..=n)
            .map(|id| (id, format!("127.0.0.1:{}", free_port())))
            .collect();
        let initial = members
            .iter()
            .map(|(id, addr)| format!("{id} = \"{addr}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let mut cluster = Self {
            dir,
            bin: bin.to_path_buf(),
            nodes: Vec::new(),
            extra: extra.to_string(),
        };
        for (id, addr) in &members {
            let config = cluster.write_config(*id, addr, &format!("{{ {initial} }}"), "new")?;
            cluster.nodes.push(KeeperNode {
                id: *id,
                addr: addr.clone(),
                config,
                process: None,
            });
        }
        for id in 1..=n {
            cluster.start_node(id)?;
        }
        cluster.leader().await?;
        Ok(cluster)
    }

    fn write_config(
        &self,
        id: u64,
        addr: &str,
        initial: &str,
        state: &str,
    ) -> anyhow::Result<PathBuf> {
        let data_dir = self.dir.path().join(format!("node-{id}"));
        let text = format!(
            "id = {id}\nlisten = \"{addr}\"\ndata_dir = \"{}\"\ninitial_cluster = {initial}\ninitial_cluster_state = \"{state}\"\n{}\n",
            data_dir.display(),
            self.extra
        );
        let path = self.dir.path().join(format!("keeper-{id}.toml"));
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Adds a node definition (not started) that will join as a learner: `existing` state.
    pub fn define_joiner(&mut self, id: u64) -> anyhow::Result<String> {
        let addr = format!("127.0.0.1:{}", free_port());
        let config = self.write_config(id, &addr, "{}", "existing")?;
        self.nodes.push(KeeperNode {
            id,
            addr: addr.clone(),
            config,
            process: None,
        });
        Ok(addr)
    }

    pub fn node(&self, id: u64) -> &KeeperNode {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .expect("known node id")
    }

    fn node_mut(&mut self, id: u64) -> &mut KeeperNode {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .expect("known node id")
    }

    /// Starts (or restarts) node `id` from its config and data dir.
    pub fn start_node(&mut self, id: u64) -> anyhow::Result<()> {
        let bin = self.bin.clone();
        let log = self.dir.path().join(format!("keeper-{id}.log"));
        let node = self.node_mut(id);
        let args = vec!["--config".to_string(), node.config.display().to_string()];
        node.process = Some(Process::start(
            &format!("keeper-{id}"),
            &bin,
            &args,
            &log,
            &[],
        )?);
        Ok(())
    }

    pub fn kill9(&mut self, id: u64) {
        if let Some(mut p) = self.node_mut(id).process.take() {
            p.kill9();
        }
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.node(id).process.is_some()
    }

    /// Client endpoints of the running nodes.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.process.is_some())
            .map(|n| n.addr.clone())
            .collect()
    }

    /// An etcd client connected to the given nodes.
    pub async fn client_for(&self, ids: &[u64]) -> anyhow::Result<Client> {
        let endpoints: Vec<String> = ids.iter().map(|id| self.node(*id).addr.clone()).collect();
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(10));
        Ok(Client::connect(endpoints, Some(options)).await?)
    }

    /// An etcd client connected to every running node.
    pub async fn client(&self) -> anyhow::Result<Client> {
        let ids: Vec<u64> = self
            .nodes
            .iter()
            .filter(|n| n.process.is_some())
            .map(|n| n.id)
            .collect();
        self.client_for(&ids).await
    }

    fn live_ids(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|n| n.process.is_some())
            .map(|n| n.id)
            .collect()
    }

    /// Waits until every running node answers `ask` with the same `Some` value, and returns it.
    async fn agreed<T, F, Fut>(&self, what: &str, ask: F) -> anyhow::Result<T>
    where
        T: PartialEq + Clone,
        F: Fn(Client) -> Fut + Clone,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let live = self.live_ids();
        wait_until(what, Duration::from_secs(30), || {
            let (live, ask) = (live.clone(), ask.clone());
            async move {
                let mut seen: Option<T> = None;
                for id in &live {
                    let client = self.client_for(&[*id]).await.ok()?;
                    let here = ask(client).await?;
                    if seen.as_ref().is_some_and(|s| *s != here) {
                        return None;
                    }
                    seen = Some(here);
                }
                seen
            }
        })
        .await
    }

    /// Waits until a running node is leader, as seen by every running node, and returns its id.
    pub async fn leader(&self) -> anyhow::Result<u64> {
        let live = self.live_ids();
        self.agreed("a leader agreed by every running node", move |mut c| {
            let live = live.clone();
            async move {
                let leader = c.status().await.ok()?.leader();
                live.contains(&leader).then_some(leader)
            }
        })
        .await
    }

    /// Waits until every running node reports the same revision and key-space hash.
    pub async fn wait_converged(&self) -> anyhow::Result<(i64, u32)> {
        self.agreed(
            "all running replicas to report the same revision and hash",
            |mut c| async move {
                let h = c.hash_kv(0).await.ok()?;
                Some((h.header()?.revision(), h.hash()))
            },
        )
        .await
    }
}
