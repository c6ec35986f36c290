//! `register-bench`: batched attaches/s, lookups/s and lookup latency at N stored sessions, and the
//! time to rebuild N sessions by Sync, against an in-process register served over real gRPC on
//! loopback. A raw RocksDB batched put run in the same process is the baseline for attaches.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use longlink_common::SLOTS;
use longlink_common::SlotMap;
use longlink_common::slot_of;
use longlink_proto::registerpb::register_client::RegisterClient;
use longlink_proto::registerpb::*;
use register::Node;
use register::RegisterConfig;
use register::gate::LeaseGate;
use register::store::Store;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// mimalloc instead of glibc malloc: every request allocates and frees thousands of small
/// strings and keys across threads; measured in docs/benchmarks.md ("register").
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(about = "Benchmark the register: attaches, lookups, rebuild")]
struct Cli {
    /// Sessions stored (and rebuilt).
    #[arg(long, default_value_t = 1_000_000)]
    sessions: usize,
    /// Sessions per Attach request.
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
    /// Concurrent clients (each one request in flight).
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Lookups measured.
    #[arg(long, default_value_t = 200_000)]
    lookups: usize,
    /// Directory for the RocksDB instances (not tmpfs).
    #[arg(long, default_value = "/var/tmp")]
    dir: std::path::PathBuf,
}

fn session(i: usize) -> Session {
    Session {
        app: "bench".into(),
        user: format!("user-{i:08}"),
        device: "phone".into(),
        room_id: "bench-room".into(),
        conn_id: i as u64 + 1,
        connected_at_ms: 1_700_000_000_000,
        client_ip: "10.0.0.1".into(),
        platform: "android".into(),
    }
}

fn all_mine(epoch: u64) -> SlotMap {
    SlotMap::fresh(epoch, vec!["bench".to_string(); usize::from(SLOTS)])
}

/// A register served on loopback for one phase of the benchmark.
struct Served {
    node: Arc<Node>,
    client: RegisterClient<Channel>,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<register::Result<()>>,
}

impl Served {
    /// Stops the server and closes the register's RocksDB before the caller removes its
    /// directory: a database still open in a server task would write a new MANIFEST into the
    /// removed directory and leave it behind.
    async fn shut_down(self) -> anyhow::Result<()> {
        let Served {
            node,
            client,
            stop,
            server,
        } = self;
        drop(client);
        stop.cancel();
        server.await??;
        anyhow::ensure!(
            Arc::strong_count(&node) == 1,
            "the register is still in use after its server stopped"
        );
        drop(node);
        Ok(())
    }
}

async fn serve(dir: &std::path::Path, rooms: &[&str]) -> anyhow::Result<Served> {
    let store = Store::open(dir)?;
    let config = RegisterConfig {
        max_batch: 100_000,
        rebuild_timeout_ms: 600_000,
        ..Default::default()
    };
    let node = Arc::new(Node::new(
        "bench",
        store,
        Arc::new(LeaseGate::always_open()),
        config,
    ));
    node.set_live_rooms(rooms.iter().map(|r| r.to_string()).collect::<BTreeSet<_>>())?;
    node.apply_map(all_mine(1))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let server = tokio::spawn(register::service::serve(
        node.clone(),
        listener,
        stop.clone(),
    ));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .initial_stream_window_size(longlink_common::GRPC_STREAM_WINDOW)
        .initial_connection_window_size(longlink_common::GRPC_CONNECTION_WINDOW)
        .connect()
        .await?;
    let client = RegisterClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    Ok(Served {
        node,
        client,
        stop,
        server,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let sessions: Arc<Vec<Session>> = Arc::new((0..cli.sessions).map(session).collect());
    let n = cli.sessions as f64;

    // Baseline: raw RocksDB batched puts of the same keys and values, WAL on, no fsync.
    let base_dir = tempfile::Builder::new()
        .prefix("register-bench-raw")
        .tempdir_in(&cli.dir)?;
    let raw_rate = {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        let db = rocksdb::DB::open(&opts, base_dir.path())?;
        let start = Instant::now();
        for chunk in sessions.chunks(cli.batch) {
            let mut batch = rocksdb::WriteBatch::default();
            for s in chunk {
                let slot = slot_of(&s.app, &s.user);
                let key = register::keys::session_key(slot, &s.app, &s.user, s.conn_id, &s.room_id);
                batch.put(&key, prost::Message::encode_to_vec(s));
            }
            db.write(batch)?;
        }
        n / start.elapsed().as_secs_f64()
    };

    // Attaches over gRPC.
    let dir = tempfile::Builder::new()
        .prefix("register-bench")
        .tempdir_in(&cli.dir)?;
    let served = serve(dir.path(), &[]).await?;
    let client = served.client.clone();
    // The requests are built before the clock starts: building them is the rooms' work, not the
    // register's (encoding and sending them is timed).
    let requests: Vec<AttachRequest> = sessions
        .chunks(cli.batch)
        .map(|chunk| AttachRequest {
            epoch: 1,
            sessions: chunk.to_vec(),
        })
        .collect();
    let requests = Arc::new(std::sync::Mutex::new(requests));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..cli.clients {
        let (mut c, requests) = (client.clone(), requests.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(req) = requests.lock().unwrap().pop() else {
                    return anyhow::Ok(());
                };
                let resp = c.attach(req).await?.into_inner();
                anyhow::ensure!(
                    resp.results.iter().all(|r| r.status == Status::Ok as i32),
                    "attach refused"
                );
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let attach_rate = n / start.elapsed().as_secs_f64();

    // Lookups over gRPC, one in flight per client, random users.
    let per_client = cli.lookups / cli.clients;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..cli.clients {
        let (mut c, sessions) = (client.clone(), sessions.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist: Vec<u32> = Vec::with_capacity(per_client);
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ k as u64;
            for _ in 0..per_client {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let s = &sessions[(x % sessions.len() as u64) as usize];
                let t = Instant::now();
                let resp = c
                    .lookup(LookupRequest {
                        epoch: 1,
                        app: s.app.clone(),
                        user: s.user.clone(),
                    })
                    .await?
                    .into_inner();
                hist.push(t.elapsed().as_micros() as u32);
                anyhow::ensure!(resp.sessions.len() == 1, "lookup missed {}", s.user);
            }
            anyhow::Ok(hist)
        }));
    }
    let mut hist: Vec<u32> = Vec::new();
    for t in tasks {
        hist.extend(t.await??);
    }
    hist.sort_unstable();
    let quantile = |q: f64| u64::from(hist[((hist.len() - 1) as f64 * q) as usize]);
    let lookup_rate = (per_client * cli.clients) as f64 / start.elapsed().as_secs_f64();
    drop(client);
    served.shut_down().await?;

    // Rebuild: a register that gained every slot, with one live room re-sending all its sessions.
    let dir2 = tempfile::Builder::new()
        .prefix("register-bench-rebuild")
        .tempdir_in(&cli.dir)?;
    let served2 = serve(dir2.path(), &["bench-room"]).await?;
    let (node2, client2) = (served2.node.clone(), served2.client.clone());
    let mut by_slot = vec![Vec::new(); usize::from(SLOTS)];
    for (i, s) in sessions.iter().enumerate() {
        by_slot[usize::from(slot_of(&s.app, &s.user))].push(i);
    }
    let slots = Arc::new(std::sync::Mutex::new((0..SLOTS).collect::<Vec<u16>>()));
    let by_slot = Arc::new(by_slot);
    assert_eq!(node2.stats().rebuilding_slots, u32::from(SLOTS));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..cli.clients {
        let (mut c, slots, by_slot, sessions) = (
            client2.clone(),
            slots.clone(),
            by_slot.clone(),
            sessions.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(slot) = slots.lock().unwrap().pop() else {
                    return anyhow::Ok(());
                };
                let req = SyncRequest {
                    epoch: 1,
                    room_id: "bench-room".into(),
                    slot: u32::from(slot),
                    sessions: by_slot[usize::from(slot)]
                        .iter()
                        .map(|i| sessions[*i].clone())
                        .collect(),
                };
                let resp = c.sync(req).await?.into_inner();
                anyhow::ensure!(
                    resp.result.as_ref().map(|r| r.status) == Some(Status::Ok as i32),
                    "sync of slot {slot} refused: {:?}",
                    resp.result
                );
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let rebuild = start.elapsed();
    anyhow::ensure!(
        node2.stats().rebuilding_slots == 0,
        "slots still rebuilding"
    );
    drop((node2, client2));
    served2.shut_down().await?;

    let ms = |us: u64| us as f64 / 1000.0;
    println!("| metric | value |");
    println!("|---|---|");
    println!("| sessions | {} |", cli.sessions);
    println!("| raw RocksDB batched puts/s (baseline) | {raw_rate:.0} |");
    println!(
        "| batched attaches/s over gRPC (batch {}, {} clients) | {attach_rate:.0} ({:.2}x baseline) |",
        cli.batch,
        cli.clients,
        attach_rate / raw_rate
    );
    println!("| lookups/s ({} clients) | {lookup_rate:.0} |", cli.clients);
    println!(
        "| lookup p50 / p99 / max (ms) | {:.3} / {:.3} / {:.3} |",
        ms(quantile(0.5)),
        ms(quantile(0.99)),
        ms(quantile(1.0))
    );
    println!(
        "| rebuild of {} sessions by Sync (1024 slots, {} clients) | {:.2} s |",
        cli.sessions,
        cli.clients,
        rebuild.as_secs_f64()
    );
    Ok(())
}
