//! Network namespaces for the nodes under test: one namespace per node, a veth pair from it to a
//! bridge in the root namespace, 10.x.y.0/24 addresses, and partitions as iptables DROP rules
//! inside the node namespaces (so clients in the root namespace still reach every node).
//!
//! Every name starts with a per-run prefix (`ll-<pid>-`), so a leftover can always be found and
//! removed by prefix: [`cleanup_prefix`] is what the `cleanup` subcommand, the panic hook, the
//! signal handler and [`Network`]'s `Drop` all call.

use std::fs::File;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use anyhow::bail;

/// Every name this harness creates starts with this, then the harness's pid.
pub const PREFIX_ROOT: &str = "ll-";

/// The prefix for names created by this process.
pub fn own_prefix() -> String {
    format!("{PREFIX_ROOT}{}-", std::process::id())
}

/// One node's place in the network.
#[derive(Debug, Clone)]
pub struct NodeNet {
    /// Network namespace name (`ip netns` entry, file under /run/netns).
    pub ns: String,
    pub ip: Ipv4Addr,
}

/// The namespaces, veths and bridge of one harness process. Dropping it removes them all (and
/// kills any process still running inside the namespaces).
#[derive(Debug)]
pub struct Network {
    pub prefix: String,
    pub bridge: String,
    /// The bridge's address: clients in the root namespace talk from it.
    pub host_ip: Ipv4Addr,
    pub nodes: Vec<NodeNet>,
}

/// Runs a command, failing with its stderr.
pub fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| {
        format!(
            "cannot run {program} (is iproute2/iptables installed? scripts/setup.sh installs them)"
        )
    })?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program args` inside namespace `ns`.
/// Starts `cmd` inside namespace `ns`: stdin closed, stdout and stderr appended to `log` after a
/// `=== jepsen-tests: starting {what} in {ns} ===` line, `LONGLINK_LOG` defaulting to `filter`.
pub fn spawn_in(
    ns: &str,
    cmd: &mut Command,
    log: &Path,
    what: &str,
    filter: &str,
) -> anyhow::Result<Child> {
    let ns_file = File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("namespace {ns} is gone"))?;
    let mut log = File::options().create(true).append(true).open(log)?;
    writeln!(log, "=== jepsen-tests: starting {what} in {ns} ===")?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .env(
            "LONGLINK_LOG",
            std::env::var("LONGLINK_LOG").unwrap_or_else(|_| filter.into()),
        );
    // SAFETY: between fork and exec the closure only makes one syscall (setns) on a file
    // opened before the fork; it allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(&ns_file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
    cmd.spawn()
        .with_context(|| format!("cannot start {}", Path::new(cmd.get_program()).display()))
}

fn in_ns(ns: &str, program: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["netns", "exec", ns, program];
    all.extend_from_slice(args);
    sh("ip", &all)
}

impl Network {
    /// Creates `n` node namespaces named `{prefix}n{i}` joined by bridge `{prefix}br`.
    /// Needs root (CAP_NET_ADMIN). On failure, whatever was created is removed.
    pub fn create(prefix: &str, n: usize) -> anyhow::Result<Self> {
        if !nix::unistd::Uid::effective().is_root() {
            bail!("jepsen-tests needs root to create network namespaces (run it with sudo)");
        }
        if n == 0 || n > 200 {
            bail!("node count {n} out of range 1..=200");
        }
        if prefix.len() + 4 > 15 {
            bail!("prefix `{prefix}` too long for Linux interface names (15 bytes)");
        }
        // A /24 picked from the pid, skipping any already on this machine, so concurrent
        // harnesses do not collide.
        let pid = std::process::id();
        let used = sh("ip", &["-o", "-4", "addr", "show"])?;
        let (a, b) = (0..256u32)
            .map(|k| {
                let x = pid.wrapping_add(k);
                (100 + ((x >> 8) % 100) as u8, (x & 0xff) as u8)
            })
            .find(|(a, b)| !used.contains(&format!(" 10.{a}.{b}.")))
            .context("no free 10.x.y.0/24 subnet")?;
        let mut net = Self {
            prefix: prefix.to_string(),
            bridge: format!("{prefix}br"),
            host_ip: Ipv4Addr::new(10, a, b, 1),
            nodes: Vec::new(),
        };
        if let Err(e) = net.build(n, a, b) {
            net.cleanup();
            return Err(e);
        }
        Ok(net)
    }

    fn build(&mut self, n: usize, a: u8, b: u8) -> anyhow::Result<()> {
        let br = self.bridge.clone();
        sh("ip", &["link", "add", &br, "type", "bridge"])?;
        sh(
            "ip",
            &["addr", "add", &format!("{}/24", self.host_ip), "dev", &br],
        )?;
        sh("ip", &["link", "set", &br, "up"])?;
        for i in 1..=n {
            let ns = format!("{}n{i}", self.prefix);
            let ip = Ipv4Addr::new(10, a, b, 10 + i as u8);
            let host_end = format!("{}v{i}", self.prefix);
            let node_end = format!("{}p{i}", self.prefix);
            sh("ip", &["netns", "add", &ns])?;
            self.nodes.push(NodeNet { ns: ns.clone(), ip });
            sh(
                "ip",
                &[
                    "link", "add", &host_end, "type", "veth", "peer", "name", &node_end,
                ],
            )?;
            sh("ip", &["link", "set", &node_end, "netns", &ns])?;
            sh("ip", &["link", "set", &host_end, "master", &br])?;
            sh("ip", &["link", "set", &host_end, "up"])?;
            sh(
                "ip",
                &[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{ip}/24"),
                    "dev",
                    &node_end,
                ],
            )?;
            sh("ip", &["-n", &ns, "link", "set", &node_end, "up"])?;
            sh("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// Drops packets from `src` arriving at `dst` (one direction). Established connections are
    /// cut too: the rule has no connection-state match.
    pub fn drop_from(&self, dst: usize, src: usize) -> anyhow::Result<()> {
        self.drop_ip(dst, &self.nodes[src].ip.to_string())
    }

    /// Drops packets from the harness (the bridge address: clients, devices, test rooms)
    /// arriving at `dst`.
    pub fn drop_from_host(&self, dst: usize) -> anyhow::Result<()> {
        self.drop_ip(dst, &self.host_ip.to_string())
    }

    /// Adds the DROP rule for packets from `src_ip` at `dst`.
    fn drop_ip(&self, dst: usize, src_ip: &str) -> anyhow::Result<()> {
        in_ns(
            &self.nodes[dst].ns,
            "iptables",
            &["-w", "-A", "INPUT", "-s", src_ip, "-j", "DROP"],
        )?;
        Ok(())
    }

    /// Removes every partition rule.
    pub fn heal(&self) -> anyhow::Result<()> {
        for node in &self.nodes {
            in_ns(&node.ns, "iptables", &["-w", "-F", "INPUT"])?;
        }
        Ok(())
    }

    /// The DROP rules in force, as `(dst, src)` node indexes.
    pub fn rules(&self) -> anyhow::Result<Vec<(usize, usize)>> {
        let mut rules = Vec::new();
        for (dst, node) in self.nodes.iter().enumerate() {
            let listing = in_ns(&node.ns, "iptables", &["-w", "-S", "INPUT"])?;
            for line in listing.lines() {
                if let Some(src) = self.nodes.iter().position(|n| {
                    line.contains(&format!("-s {}/32", n.ip)) && line.contains("DROP")
                }) {
                    rules.push((dst, src));
                }
            }
        }
        Ok(rules)
    }

    /// Removes everything this network created.
    pub fn cleanup(&mut self) {
        if let Err(e) = cleanup_prefix(&self.prefix) {
            eprintln!("jepsen-tests: cleanup of {}: {e:#}", self.prefix);
        }
        self.nodes.clear();
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Namespaces whose name starts with `prefix`.
pub fn namespaces(prefix: &str) -> anyhow::Result<Vec<String>> {
    Ok(sh("ip", &["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect())
}

/// Links in the root namespace whose name starts with `prefix`.
pub fn links(prefix: &str) -> anyhow::Result<Vec<String>> {
    Ok(sh("ip", &["-o", "link", "show"])?
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .filter(|n| n.starts_with(prefix))
        .collect())
}

/// Kills every process inside the namespaces named `prefix*`, deletes the namespaces (and with
/// them the veth pairs and iptables rules), then deletes any remaining root-namespace link named
/// `prefix*` (bridges, orphaned veth ends). Returns what it removed. Idempotent.
pub fn cleanup_prefix(prefix: &str) -> anyhow::Result<Vec<String>> {
    let mut removed = Vec::new();
    for ns in namespaces(prefix)? {
        kill_namespace_processes(&ns);
        if let Err(e) = sh("ip", &["netns", "del", &ns]) {
            eprintln!("jepsen-tests: {e:#}");
        }
        removed.push(format!("netns {ns}"));
    }
    // Deleting a namespace destroys its veth ends asynchronously; wait for the host ends to go
    // before deleting what is left, so we do not race the kernel.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = links(prefix)?;
        let only_bridges = left.iter().all(|l| l.ends_with("br"));
        if only_bridges || Instant::now() > deadline {
            for link in left {
                if sh("ip", &["link", "del", &link]).is_ok() {
                    removed.push(format!("link {link}"));
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(removed)
}

/// SIGKILLs every process in namespace `ns` (a stopped process dies too) and waits briefly for
/// them to go, so the namespace can be deleted.
fn kill_namespace_processes(ns: &str) {
    let Ok(pids) = sh("ip", &["netns", "pids", ns]) else {
        return;
    };
    let pids: Vec<i32> = pids.lines().filter_map(|l| l.trim().parse().ok()).collect();
    for pid in &pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && pids
            .iter()
            .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists() && !is_zombie(*p))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Prefixes of leftovers from harness processes that are no longer running (their pid is gone
/// or is not a jepsen-tests process). With `all`, every `ll-*` prefix.
pub fn stale_prefixes(all: bool) -> anyhow::Result<Vec<String>> {
    let mut prefixes: Vec<String> = namespaces(PREFIX_ROOT)?
        .into_iter()
        .chain(links(PREFIX_ROOT)?)
        .filter_map(|name| {
            let pid = name
                .strip_prefix(PREFIX_ROOT)?
                .split('-')
                .next()?
                .to_string();
            pid.parse::<u32>().ok()?;
            Some(pid)
        })
        .filter(|pid| all || !harness_alive(pid))
        .map(|pid| format!("{PREFIX_ROOT}{pid}-"))
        .collect();
    prefixes.sort();
    prefixes.dedup();
    Ok(prefixes)
}

fn harness_alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
        .map(|c| c.contains("jepsen"))
        .unwrap_or(false)
}
