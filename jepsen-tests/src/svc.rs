//! Service processes under test (register, room, center), each in its own network namespace:
//! start, kill -9 and restart with the same arguments and data, SIGSTOP / SIGCONT. The keeper
//! has its own richer type ([`crate::cluster`]); these only need a command line.

use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use anyhow::bail;
use nix::sys::signal::Signal;
use nix::sys::signal::kill;
use nix::unistd::Pid;

use crate::nemesis::Schedule;
use crate::net::Network;

/// Settings every register or push run shares.
#[derive(Debug, Clone)]
pub struct ServiceRunConfig {
    /// Workload and faults per run.
    pub time: Duration,
    /// Keeper nodes (the first namespaces; never faulted); the services follow.
    pub keepers: usize,
    /// Directory with the keeper, register, room and center binaries.
    pub bin_dir: PathBuf,
    pub schedule: Schedule,
    pub op_timeout: Duration,
    /// Registers' instance lease TTL (bounds failover).
    pub lease_ttl_s: u64,
    pub users: usize,
    /// After heal, the system must have converged within this.
    pub recovery_limit: Duration,
    /// Directory of this invocation (a `run-N` subdirectory per run).
    pub out: PathBuf,
    pub keep_data: bool,
}

/// What part of Longlink a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Register,
    Room,
    Center,
}

/// One service process and how to (re)start it.
#[derive(Debug)]
pub struct Svc {
    /// Instance id (`r1`, `room-1`, `center-1`): also its name in the history.
    pub name: String,
    pub role: Role,
    /// Index of its namespace in the [`Network`].
    pub node: usize,
    pub bin: PathBuf,
    pub args: Vec<String>,
    pub log: PathBuf,
    /// SIGSTOPped by the nemesis.
    pub paused: bool,
    /// Bumped by every kill -9, shared with clients that must tell process lifetimes apart
    /// (a device records the room's incarnation with each connection).
    pub incarnation: Arc<AtomicU32>,
    child: Option<Child>,
}

impl Svc {
    /// A process not started yet.
    pub fn new(
        name: &str,
        role: Role,
        node: usize,
        bin: &Path,
        args: Vec<String>,
        dir: &Path,
    ) -> Self {
        Self {
            name: name.to_string(),
            role,
            node,
            bin: bin.to_path_buf(),
            args,
            log: dir.join(format!("{name}.log")),
            paused: false,
            incarnation: Arc::new(AtomicU32::new(0)),
            child: None,
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts it inside its namespace (no-op if running); output goes to its log.
    pub fn spawn(&mut self, net: &Network) -> anyhow::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        if !self.bin.exists() {
            bail!(
                "{} not found; build the workspace first (cd /work/main && cargo build --workspace --all-targets --locked)",
                self.bin.display()
            );
        }
        let what = format!(
            "{} (incarnation {})",
            self.name,
            self.incarnation.load(Ordering::Relaxed)
        );
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.args);
        let child =
            crate::net::spawn_in(&net.nodes[self.node].ns, &mut cmd, &self.log, &what, "info")?;
        self.child = Some(child);
        self.paused = false;
        Ok(())
    }

    /// kill -9 and reap it (a stopped process dies too).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            self.incarnation.fetch_add(1, Ordering::Relaxed);
        }
        self.paused = false;
    }

    pub fn pause(&mut self) -> anyhow::Result<()> {
        let child = self.child.as_ref().context("not running")?;
        kill(Pid::from_raw(child.id() as i32), Signal::SIGSTOP)?;
        self.paused = true;
        Ok(())
    }

    pub fn resume(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_ref() {
            kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT)?;
        }
        self.paused = false;
        Ok(())
    }

    /// Whether it exited on its own (a crash), reaping it if so.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }
}

impl Drop for Svc {
    fn drop(&mut self) {
        let _ = self.resume();
        self.kill9();
    }
}
