//! `sdk-bench`: measures the keeper SDK end to end against a 3-node keeper it starts itself.
//!
//! - `config-push`: config subscribers spread over child processes; each pushed version is
//!   timed from the push until every subscriber's `/applied` report shows it.
//! - `discovery-churn`: instances registered on leases from child processes; one child holding
//!   `--kill` of them is killed with SIGKILL, and we time until every discovery watcher has seen
//!   every removal. Keeper CPU per keep-alive comes from `/proc/<pid>/stat`.
//!
//! Children are this binary run with a hidden subcommand (`subscriber`, `registrar`).

use std::collections::BTreeSet;
use std::path::Path;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use clap::Subcommand;
use hdrhistogram::Histogram;
use keeper_sdk::ConnectOptions;
use keeper_sdk::EventKind;
use keeper_sdk::Instance;
use keeper_sdk::Keeper;
use keeper_sdk::layout;
use keeper_sdk::layout::AppliedReport;
use keeper_sdk::layout::ConfigDocument;
use keeper_sdk::layout::Format;
use tokio::io::AsyncBufReadExt;
use tokio::process::Child;

#[derive(Debug, Parser)]
#[command(about = "Benchmarks the keeper SDK: config push fan-out and discovery churn")]
struct Cli {
    /// The keeper binary to start (default: `keeper` next to this binary).
    #[arg(long, global = true)]
    keeper_bin: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Push N config versions to `--subscribers` SDK subscribers in `--procs` processes.
    ConfigPush {
        #[arg(long, default_value_t = 100)]
        subscribers: usize,
        #[arg(long, default_value_t = 4)]
        procs: usize,
        /// Versions pushed (one at a time, each after every subscriber applied the previous).
        #[arg(long, default_value_t = 50)]
        versions: u64,
    },
    /// Register `--instances` on `--ttl` leases, SIGKILL the process holding `--kill` of them.
    DiscoveryChurn {
        #[arg(long, default_value_t = 10_000)]
        instances: usize,
        #[arg(long, default_value_t = 1_000)]
        kill: usize,
        #[arg(long, default_value_t = 10)]
        ttl: i64,
        /// Processes holding the instances that stay.
        #[arg(long, default_value_t = 9)]
        procs: usize,
        /// Discovery watchers (each its own connection), all in this process.
        #[arg(long, default_value_t = 3)]
        watchers: usize,
        /// Steady-state window over which keeper CPU is measured, in seconds.
        #[arg(long, default_value_t = 20)]
        cpu_window: u64,
    },
    #[command(hide = true)]
    Subscriber {
        #[arg(long, value_delimiter = ',')]
        endpoints: Vec<String>,
        #[arg(long)]
        service: String,
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        count: usize,
    },
    #[command(hide = true)]
    Registrar {
        #[arg(long, value_delimiter = ',')]
        endpoints: Vec<String>,
        #[arg(long)]
        service: String,
        #[arg(long)]
        first: usize,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        ttl: i64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Cmd::Subscriber {
                endpoints,
                service,
                prefix,
                count,
            } => subscriber(endpoints, &service, &prefix, count).await,
            Cmd::Registrar {
                endpoints,
                service,
                first,
                count,
                ttl,
            } => registrar(endpoints, &service, first, count, ttl).await,
            Cmd::ConfigPush {
                subscribers,
                procs,
                versions,
            } => {
                let cluster = Cluster::start(&keeper_bin(cli.keeper_bin)?).await?;
                let r = config_push(&cluster, subscribers, procs.max(1), versions).await;
                cluster.stop();
                r
            }
            Cmd::DiscoveryChurn {
                instances,
                kill,
                ttl,
                procs,
                watchers,
                cpu_window,
            } => {
                let cluster = Cluster::start(&keeper_bin(cli.keeper_bin)?).await?;
                let r = churn(
                    &cluster,
                    instances,
                    kill,
                    ttl,
                    procs.max(1),
                    watchers,
                    cpu_window,
                )
                .await;
                cluster.stop();
                r
            }
        }
    })
}

fn keeper_bin(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .join("keeper"),
    };
    anyhow::ensure!(
        path.exists(),
        "keeper binary {} not found: build it (cargo build -p keeper --bins) or pass --keeper-bin",
        path.display()
    );
    Ok(path)
}

/// A 3-node keeper on loopback in a temp dir, killed and removed by `stop`.
struct Cluster {
    dir: PathBuf,
    endpoints: Vec<String>,
    procs: Vec<std::process::Child>,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Cluster {
    async fn start(bin: &Path) -> anyhow::Result<Self> {
        // On disk, not tmpfs, so fsync costs what it costs (`BENCH_TMPDIR` moves it).
        let dir = std::env::var_os("BENCH_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp"))
            .join(format!("sdk-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let addrs: Vec<String> = (0..3)
            .map(|_| free_port().map(|p| format!("127.0.0.1:{p}")))
            .collect::<anyhow::Result<_>>()?;
        let initial = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{} = \"{a}\"", i + 1))
            .collect::<Vec<_>>()
            .join(", ");
        let mut procs = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let id = i + 1;
            let config = dir.join(format!("keeper-{id}.toml"));
            std::fs::write(
                &config,
                format!(
                    "id = {id}\nlisten = \"{addr}\"\ndata_dir = \"{}\"\ninitial_cluster = {{ {initial} }}\ninitial_cluster_state = \"new\"\n",
                    dir.join(format!("node-{id}")).display()
                ),
            )?;
            let log = std::fs::File::create(dir.join(format!("keeper-{id}.log")))?;
            let child = std::process::Command::new(bin)
                .arg("--config")
                .arg(&config)
                .env("LONGLINK_LOG", "warn")
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            procs.push(child);
        }
        let cluster = Self {
            dir,
            endpoints: addrs,
            procs,
        };
        // Ready when a write commits.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = match Keeper::connect(&cluster.endpoints).await {
                Ok(k) => k.put("/sdk-bench/ready", "1").await.is_ok(),
                Err(_) => false,
            };
            if ok {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "keeper cluster did not start within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!("keeper cluster up: {}", cluster.endpoints.join(","));
        Ok(cluster)
    }

    fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.id()).collect()
    }

    fn stop(mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts this binary with `args`, and waits for it to print `ready`.
async fn spawn_child(args: &[String]) -> anyhow::Result<Child> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(args)
        .env("LONGLINK_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    loop {
        match lines.next_line().await? {
            Some(l) if l.trim() == "ready" => break,
            Some(_) => {}
            None => anyhow::bail!("child {args:?} exited before it was ready"),
        }
    }
    // Keep draining so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(child)
}

async fn subscriber(
    endpoints: Vec<String>,
    service: &str,
    prefix: &str,
    count: usize,
) -> anyhow::Result<()> {
    let mut handles = Vec::with_capacity(count);
    for i in 0..count {
        // One Keeper per subscriber: its own instance id, connection and session lease, as a
        // separate service process would have.
        let mut opts = ConnectOptions::new(&endpoints);
        opts.instance = Some(format!("{prefix}-{i}"));
        let keeper = Keeper::connect_with(opts).await?;
        handles.push((keeper.config::<serde_json::Value>(service).await?, keeper));
    }
    println!("ready");
    std::future::pending::<()>().await;
    drop(handles);
    Ok(())
}

async fn registrar(
    endpoints: Vec<String>,
    service: &str,
    first: usize,
    count: usize,
    ttl: i64,
) -> anyhow::Result<()> {
    let mut opts = ConnectOptions::new(&endpoints);
    opts.lease_ttl_s = ttl;
    opts.request_timeout = Duration::from_secs(30);
    let keeper = Keeper::connect_with(opts).await?;
    let mut registrations = Vec::with_capacity(count);
    let ids: Vec<usize> = (first..first + count).collect();
    for chunk in ids.chunks(100) {
        // 100 registrations in flight at a time.
        let mut batch = tokio::task::JoinSet::new();
        for i in chunk {
            let keeper = keeper.clone();
            let service = service.to_string();
            let instance = Instance {
                id: format!("inst-{i:06}"),
                ..Default::default()
            };
            batch.spawn(async move { keeper.register(&service, instance).await });
        }
        while let Some(r) = batch.join_next().await {
            registrations.push(r??);
        }
    }
    println!("ready");
    std::future::pending::<()>().await;
    drop(registrations);
    Ok(())
}

fn hist() -> Histogram<u64> {
    Histogram::new(3).expect("3 significant digits")
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

fn doc(version: u64) -> anyhow::Result<Vec<u8>> {
    Ok(serde_json::to_vec(&ConfigDocument {
        version,
        format: Format::Json,
        body: format!("{{\"value\": {version}}}"),
        updated_at: layout::now_rfc3339(),
        author: "sdk-bench".into(),
    })?)
}

async fn config_push(
    cluster: &Cluster,
    subscribers: usize,
    procs: usize,
    versions: u64,
) -> anyhow::Result<()> {
    let service = "bench";
    let pusher = Keeper::connect(&cluster.endpoints).await?;
    pusher.put(&layout::config_key(service), doc(1)?).await?;
    eprintln!("starting {subscribers} subscribers in {procs} processes...");
    let mut children = Vec::new();
    let per = subscribers.div_ceil(procs);
    let mut started = 0;
    for p in 0..procs {
        let count = per.min(subscribers - started);
        if count == 0 {
            break;
        }
        // Spread the processes' first endpoint over the nodes.
        let mut eps = cluster.endpoints.clone();
        let n = eps.len();
        eps.rotate_left(p % n);
        children.push(
            spawn_child(&[
                "subscriber".into(),
                "--endpoints".into(),
                eps.join(","),
                "--service".into(),
                service.into(),
                "--prefix".into(),
                format!("sub{p}"),
                "--count".into(),
                count.to_string(),
            ])
            .await?,
        );
        started += count;
        eprintln!("  {started}/{subscribers} subscribed");
    }

    let applied_prefix = layout::applied_prefix(service);
    let (_, rev) = pusher.get_prefix(&applied_prefix).await?;
    let mut watch = pusher.watch_prefix(&applied_prefix, rev + 1).await?;
    let mut each = hist();
    let mut all = hist();
    for version in 2..=versions + 1 {
        let start = Instant::now();
        pusher
            .put(&layout::config_key(service), doc(version)?)
            .await?;
        let mut seen = BTreeSet::new();
        while seen.len() < subscribers {
            let events = tokio::time::timeout(Duration::from_secs(30), watch.next())
                .await
                .with_context(|| {
                    format!(
                        "version {version}: only {} of {subscribers} applied within 30 s",
                        seen.len()
                    )
                })??;
            for e in events {
                if e.kind != EventKind::Put {
                    continue;
                }
                let Ok(report) = e.kv.json::<AppliedReport>() else {
                    continue;
                };
                if report.version == version && report.ok && seen.insert(e.kv.key.clone()) {
                    each.record(start.elapsed().as_micros() as u64 + 1)?;
                }
            }
        }
        let took = start.elapsed();
        all.record(took.as_micros() as u64 + 1)?;
        eprintln!(
            "  version {}/{}: all {subscribers} applied in {:.1} ms",
            version - 1,
            versions,
            took.as_secs_f64() * 1000.0
        );
    }
    println!(
        "config-push: {subscribers} subscribers in {} processes, {versions} versions",
        children.len()
    );
    println!(
        "  per subscriber push->applied: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(each.value_at_quantile(0.5)),
        ms(each.value_at_quantile(0.99)),
        ms(each.max())
    );
    println!(
        "  push->all applied:            p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(all.value_at_quantile(0.5)),
        ms(all.value_at_quantile(0.99)),
        ms(all.max())
    );
    drop(children);
    Ok(())
}

/// utime + stime of `pid` in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; fields start after its closing parenthesis.
    let rest = stat.rsplit_once(')').context("malformed /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// Keeper CPU seconds (all nodes) over `window`.
async fn keeper_cpu(pids: &[u32], window: Duration) -> anyhow::Result<f64> {
    let before: u64 = pids
        .iter()
        .map(|p| cpu_ticks(*p))
        .sum::<anyhow::Result<u64>>()?;
    tokio::time::sleep(window).await;
    let after: u64 = pids
        .iter()
        .map(|p| cpu_ticks(*p))
        .sum::<anyhow::Result<u64>>()?;
    Ok((after - before) as f64 / clock_ticks_per_second() as f64)
}

#[allow(clippy::too_many_arguments)]
async fn churn(
    cluster: &Cluster,
    instances: usize,
    kill: usize,
    ttl: i64,
    procs: usize,
    watchers: usize,
    cpu_window: u64,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        kill <= instances,
        "--kill {kill} is above --instances {instances}"
    );
    let service = "churn";
    let window = Duration::from_secs(cpu_window);
    eprintln!("measuring idle keeper CPU over {cpu_window} s...");
    let idle = keeper_cpu(&cluster.pids(), window).await?;

    let stay = instances - kill;
    let per = stay.div_ceil(procs).max(1);
    let mut children = Vec::new();
    let mut first = 0;
    let mut p = 0;
    let start_reg = Instant::now();
    let spawn = |first: usize, count: usize, p: usize| {
        let mut eps = cluster.endpoints.clone();
        let n = eps.len();
        eps.rotate_left(p % n);
        vec![
            "registrar".to_string(),
            "--endpoints".into(),
            eps.join(","),
            "--service".into(),
            service.into(),
            "--first".into(),
            first.to_string(),
            "--count".into(),
            count.to_string(),
            "--ttl".into(),
            ttl.to_string(),
        ]
    };
    while first < stay {
        let count = per.min(stay - first);
        children.push(spawn_child(&spawn(first, count, p)).await?);
        first += count;
        p += 1;
        eprintln!(
            "  {first}/{instances} registered ({:.1} s)",
            start_reg.elapsed().as_secs_f64()
        );
    }
    let victim = spawn_child(&spawn(first, kill, p)).await?;
    eprintln!(
        "  {instances}/{instances} registered ({:.1} s)",
        start_reg.elapsed().as_secs_f64()
    );

    let mut discoveries = Vec::new();
    for w in 0..watchers {
        let mut eps = cluster.endpoints.clone();
        let n = eps.len();
        eps.rotate_left(w % n);
        let k = Keeper::connect(&eps).await?;
        discoveries.push((k.discover(service).await?, k));
    }
    for (d, _) in &discoveries {
        anyhow::ensure!(
            d.instances().len() == instances,
            "a watcher sees {} instances, expected {instances}",
            d.instances().len()
        );
    }
    eprintln!("measuring keeper CPU with {instances} leases kept alive over {cpu_window} s...");
    let busy = keeper_cpu(&cluster.pids(), window).await?;
    // Each lease is kept alive every ttl/3 seconds.
    let interval_s = (ttl as f64 / 3.0 * 1000.0).max(100.0) / 1000.0;
    let keepalives = instances as f64 * cpu_window as f64 / interval_s;

    let killed: Arc<BTreeSet<String>> =
        Arc::new((stay..instances).map(|i| format!("inst-{i:06}")).collect());
    let mut victim = victim;
    let t0 = Instant::now();
    victim.start_kill()?;
    let _ = victim.wait().await;
    eprintln!("killed the process holding {kill} instances; waiting for every watcher...");
    let mut times = Vec::new();
    let mut tasks = Vec::new();
    for (mut d, k) in discoveries {
        let killed = killed.clone();
        tasks.push(tokio::spawn(async move {
            let _connection = k;
            loop {
                let list = d.instances();
                if !list.iter().any(|i| killed.contains(&i.id)) {
                    return Ok::<_, anyhow::Error>((t0.elapsed(), list.len()));
                }
                tokio::time::timeout(Duration::from_secs(ttl as u64 * 3 + 30), d.changed())
                    .await
                    .context("removals did not arrive")??;
            }
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (took, left) = t.await??;
        eprintln!(
            "  watcher {i}: all {kill} removals seen after {:.2} s ({left} left)",
            took.as_secs_f64()
        );
        anyhow::ensure!(
            left == stay,
            "watcher {i} ended with {left} instances, expected {stay}"
        );
        times.push(took);
    }
    let worst = times.iter().max().copied().unwrap_or_default();
    println!(
        "discovery-churn: {instances} instances on {ttl} s leases in {} processes, {kill} killed, {watchers} watchers",
        children.len() + 1
    );
    println!(
        "  every watcher saw every removal after {:.2} s (TTL {ttl} s; target <= TTL + 1 s)",
        worst.as_secs_f64()
    );
    println!(
        "  keeper CPU (3 nodes) over {cpu_window} s: idle {idle:.2} s, with leases {busy:.2} s; {keepalives:.0} keep-alives -> {:.1} us CPU per keep-alive",
        (busy - idle).max(0.0) / keepalives * 1e6
    );
    drop(children);
    Ok(())
}
