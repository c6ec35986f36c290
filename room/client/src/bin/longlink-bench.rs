//! longlink-bench: load generator for rooms.
//! - `conns`: holds N authenticated idle connections (spread over source addresses), reports the
//!   connect rate and, given the room's pid, its RSS per connection.
//! - `fanout`: holds N connections of one app, broadcasts through the room's gRPC and measures
//!   deliveries/s and the time until every connection has the message.
//! - `storm`: N clients connect and authenticate at once: handshakes/s, against a baseline of N
//!   bare TCP connects to the same listener in the same run.
//!
//! Every mode prints one human line per result, or one JSON object with `--json`.

use std::net::IpAddr;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use clap::Parser;
use clap::Subcommand;
use longlink_client::Connection;
use longlink_client::Frame;
use longlink_proto::roompb;
use longlink_proto::roompb::room_client::RoomClient;
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;

#[derive(Debug, Parser)]
#[command(about = "Load generator for Longlink rooms")]
struct Cli {
    /// Room TCP address.
    #[arg(long, default_value = "127.0.0.1:7100")]
    addr: SocketAddr,
    /// App id and its JWT secret.
    #[arg(long, default_value = "demo")]
    app: String,
    #[arg(long, env = "LONGLINK_SECRET")]
    secret: String,
    /// Local source addresses to spread connections over (e.g. 127.0.0.2,127.0.0.3), to get
    /// past the ephemeral port range of one address.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    sources: Vec<IpAddr>,
    /// Connections in flight at once while connecting.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// User ids are `{user_prefix}-{i}`: give each bench process its own prefix so that
    /// processes never share a user.
    #[arg(long, default_value = "bench")]
    user_prefix: String,
    /// Print one JSON object per result instead of text.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Hold N idle authenticated connections.
    Conns {
        #[arg(long)]
        n: usize,
        /// Read the room's RSS from /proc/PID/status before and after.
        #[arg(long)]
        room_pid: Option<u32>,
        /// Keep them this long after connecting (pings keep them alive).
        #[arg(long, default_value_t = 5)]
        hold_s: u64,
    },
    /// Broadcast to N connections and time the deliveries.
    Fanout {
        #[arg(long)]
        n: usize,
        /// The room's gRPC address.
        #[arg(long, default_value = "127.0.0.1:7102")]
        grpc: SocketAddr,
        #[arg(long, default_value_t = 10)]
        rounds: usize,
    },
    /// N clients connect and authenticate at once.
    Storm {
        #[arg(long)]
        n: usize,
    },
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A socket bound to source address `src`, its port left for `connect` to pick
/// (`IP_BIND_ADDRESS_NO_PORT`): a `bind` to port 0 must find a port unused by every socket on
/// that address, a search that grows with the connections already open and made a one-process
/// storm (9 500 connections per source address) ten times slower than the room.
fn bound_socket(src: IpAddr) -> std::io::Result<TcpSocket> {
    let socket = match src {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    let one: libc::c_int = 1;
    // SAFETY: a valid descriptor owned by `socket`, and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.bind(SocketAddr::new(src, 0))?;
    Ok(socket)
}

async fn connect_one(cli: &Cli, i: usize) -> anyhow::Result<Connection> {
    let socket = bound_socket(cli.sources[i % cli.sources.len()])?;
    let stream = socket.connect(cli.addr).await?;
    let mut c = Connection::from_tcp(stream)?;
    let token = longlink_client::token(
        &cli.app,
        &format!("{}-{i}", cli.user_prefix),
        Some("bench"),
        &cli.secret,
        Duration::from_secs(3600),
    );
    c.auth(&token).await?;
    Ok(c)
}

/// Opens `n` bare TCP connections (no auth) with the same concurrency and source addresses as
/// [`connect_many`], closing each at once: the kernel-and-accept baseline for `storm`.
async fn tcp_baseline(cli: &Arc<Cli>, n: usize) -> anyhow::Result<Duration> {
    let sem = Arc::new(Semaphore::new(cli.concurrency));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        let cli = cli.clone();
        tasks.push(tokio::spawn(async move {
            let socket = bound_socket(cli.sources[i % cli.sources.len()])?;
            let stream = socket.connect(cli.addr).await;
            drop(permit);
            stream.map(drop)
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(started.elapsed())
}

/// Prints `text`, or `json` with `--json`.
fn report(cli: &Cli, text: String, json: serde_json::Value) {
    if cli.json {
        println!("{json}");
    } else {
        println!("{text}");
    }
}

/// Connects `n` clients with bounded concurrency; returns them and the elapsed time.
async fn connect_many(cli: &Arc<Cli>, n: usize) -> anyhow::Result<(Vec<Connection>, Duration)> {
    let sem = Arc::new(Semaphore::new(cli.concurrency));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        let cli = cli.clone();
        tasks.push(tokio::spawn(async move {
            let r = connect_one(&cli, i).await;
            drop(permit);
            r
        }));
    }
    let mut conns = Vec::with_capacity(n);
    for t in tasks {
        conns.push(t.await??);
    }
    Ok((conns, started.elapsed()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Arc::new(Cli::parse());
    match &cli.mode {
        Mode::Conns {
            n,
            room_pid,
            hold_s,
        } => {
            let before = room_pid.and_then(rss_kib);
            let (conns, took) = connect_many(&cli, *n).await?;
            let rate = *n as f64 / took.as_secs_f64();
            report(
                &cli,
                format!("conns: {n} authenticated in {took:.2?} ({rate:.0}/s)"),
                serde_json::json!({"mode": "conns", "n": n, "connect_s": took.as_secs_f64(), "connects_per_s": rate}),
            );
            // Let the room settle (handshake buffers freed) before measuring.
            tokio::time::sleep(Duration::from_secs(*hold_s)).await;
            if let (Some(pid), Some(before)) = (room_pid, before) {
                let after = rss_kib(*pid).unwrap_or(0);
                let per_conn = (after.saturating_sub(before) as f64 * 1024.0) / *n as f64;
                report(
                    &cli,
                    format!(
                        "room rss: {before} KiB -> {after} KiB, {per_conn:.0} bytes per connection"
                    ),
                    serde_json::json!({"mode": "rss", "n": n, "before_kib": before, "after_kib": after, "bytes_per_conn": per_conn}),
                );
            }
            drop(conns);
        }
        Mode::Fanout { n, grpc, rounds } => {
            let (conns, _) = connect_many(&cli, *n).await?;
            let mut client = RoomClient::connect(format!("http://{grpc}")).await?;
            let received = Arc::new(AtomicU64::new(0));
            let mut readers = Vec::new();
            for mut c in conns {
                let received = received.clone();
                readers.push(tokio::spawn(async move {
                    while let Ok(Some(f)) = c.recv().await {
                        if matches!(f, Frame::Message(_)) {
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
            let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
            let started = Instant::now();
            for r in 0..*rounds {
                let target = received.load(Ordering::Relaxed) + *n as u64;
                let t0 = Instant::now();
                client
                    .broadcast(roompb::BroadcastRequest {
                        app: cli.app.clone(),
                        message: Some(roompb::Message {
                            id: format!("b{r}"),
                            qos: 0,
                            payload: br#"{"bench":true}"#.to_vec(),
                            ts: 0,
                        }),
                    })
                    .await?;
                while received.load(Ordering::Relaxed) < target {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                    if t0.elapsed() > Duration::from_secs(30) {
                        anyhow::bail!("round {r}: deliveries stalled");
                    }
                }
                hist.record(t0.elapsed().as_micros() as u64)?;
            }
            let total = started.elapsed();
            let rate = (n * rounds) as f64 / total.as_secs_f64();
            let (p50, p99) = (
                hist.value_at_quantile(0.5) as f64 / 1000.0,
                hist.value_at_quantile(0.99) as f64 / 1000.0,
            );
            report(
                &cli,
                format!(
                    "fanout: {} deliveries in {total:.2?} ({rate:.0}/s); completion p50 {p50} ms p99 {p99} ms",
                    n * rounds
                ),
                serde_json::json!({"mode": "fanout", "n": n, "rounds": rounds, "deliveries_per_s": rate, "completion_p50_ms": p50, "completion_p99_ms": p99}),
            );
        }
        Mode::Storm { n } => {
            let base = tcp_baseline(&cli, *n).await?;
            let base_rate = *n as f64 / base.as_secs_f64();
            let (conns, took) = connect_many(&cli, *n).await?;
            let rate = *n as f64 / took.as_secs_f64();
            report(
                &cli,
                format!(
                    "storm: {n} handshakes in {took:.2?} ({rate:.0}/s); bare TCP connects {base_rate:.0}/s; ratio {:.2}",
                    rate / base_rate
                ),
                serde_json::json!({"mode": "storm", "n": n, "handshakes_per_s": rate, "tcp_connects_per_s": base_rate, "ratio": rate / base_rate}),
            );
            drop(conns);
        }
    }
    Ok(())
}
