//! Keeper workloads: register clients (get / put / compare-and-swap on a few keys), durability
//! writers (each key written once), and watchers (one prefix watch, resumed often). Every client
//! has one operation in flight, never retries a write, and retires its id after an `unknown`.

use std::collections::HashMap;
use std::time::Duration;

use etcd_client::Client;
use etcd_client::Compare;
use etcd_client::CompareOp;
use etcd_client::EventType;
use etcd_client::Txn;
use etcd_client::TxnOp;
use etcd_client::WatchOptions;
use rand::Rng;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::checker::watch::Resume;
use crate::checker::watch::WatchEvent;
use crate::checker::watch::WatcherLog;
use crate::cluster::client;
use crate::history::Args;
use crate::history::Op;
use crate::history::OpKind;
use crate::history::OpResult;
use crate::history::Outcome;
use crate::history::Recorder;

/// Everything the workloads write lives under this prefix (the watchers watch all of it).
pub const ROOT: &str = "/jepsen/";
/// Register keys: `/jepsen/r/<n>`.
pub const REGISTER_PREFIX: &str = "/jepsen/r/";
/// Durability keys: `/jepsen/d/<writer>/<seq>`, each written once.
pub const DURABLE_PREFIX: &str = "/jepsen/d/";

/// What every client needs.
#[derive(Clone)]
pub struct Ctx {
    pub rec: Recorder,
    /// Address of each node slot.
    pub addrs: Vec<String>,
    /// A request not answered within this is `unknown`.
    pub op_timeout: Duration,
    /// Upper bound of the random pause between two operations of one client.
    pub think: Duration,
    pub seed: u64,
}

/// Whether an error proves the request never took effect. Only a refused connection from this
/// client (nothing was sent) and rejections by validation qualify; anything else (timeouts, lost connections,
/// "no leader" from a node that may have proposed it) might have been applied.
pub fn classify(e: &etcd_client::Error) -> Outcome {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            use tonic::Code;
            // Only this client's own connect failure counts. A server's message that merely
            // quotes a refused connection (a follower failing to forward, possibly after an
            // earlier attempt got through) does not prove the write went nowhere.
            let msg = s.message();
            let never_sent =
                msg.starts_with("tcp connect error") || msg.starts_with("error trying to connect");
            match s.code() {
                Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                    Outcome::Fail
                }
                Code::Unavailable | Code::Unknown if never_sent => Outcome::Fail,
                _ => Outcome::Unknown,
            }
        }
        etcd_client::Error::TransportError(t) if t.to_string().contains("tcp connect error") => {
            Outcome::Fail
        }
        _ => Outcome::Unknown,
    }
}

fn parse(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// Runs one operation against `c` and records it.
pub async fn execute(
    ctx: &Ctx,
    c: &mut Client,
    client_id: u64,
    node: Option<usize>,
    op: OpKind,
    args: Args,
) -> Op {
    let call_time = ctx.rec.now();
    let key = args.key.clone();
    let fut = async {
        match op {
            OpKind::Get => {
                let r = c.get(key.as_str(), None).await?;
                Ok::<_, etcd_client::Error>(OpResult {
                    value: r.kvs().first().and_then(|kv| parse(kv.value())),
                    succeeded: None,
                    revision: r.header().map(|h| h.revision()),
                })
            }
            OpKind::Put => {
                let v = args.value.unwrap_or_default().to_string();
                let r = c.put(key.as_str(), v, None).await?;
                Ok(OpResult {
                    value: None,
                    succeeded: None,
                    revision: r.header().map(|h| h.revision()),
                })
            }
            OpKind::Cas => {
                let expect = args.expect.unwrap_or_default().to_string();
                let v = args.value.unwrap_or_default().to_string();
                let txn = Txn::new()
                    .when([Compare::value(key.as_str(), CompareOp::Equal, expect)])
                    .and_then([TxnOp::put(key.as_str(), v, None)]);
                let r = c.txn(txn).await?;
                Ok(OpResult {
                    value: None,
                    succeeded: Some(r.succeeded()),
                    revision: r.header().map(|h| h.revision()),
                })
            }
        }
    };
    let (outcome, result, error) = match tokio::time::timeout(ctx.op_timeout, fut).await {
        Ok(Ok(r)) => (Outcome::Ok, Some(r), None),
        Ok(Err(e)) => (classify(&e), None, Some(e.to_string())),
        Err(_) => (
            Outcome::Unknown,
            None,
            Some(format!("no answer within {:?}", ctx.op_timeout)),
        ),
    };
    let op = Op {
        client: client_id,
        op,
        args,
        call_time,
        return_time: ctx.rec.now(),
        outcome,
        result,
        error,
        node,
    };
    ctx.rec.op(op.clone());
    op
}

/// A client identity bound to one node; replaced after an `unknown` outcome.
struct Session {
    id: u64,
    client: Client,
}

async fn session(ctx: &Ctx, node: usize) -> anyhow::Result<Session> {
    Ok(Session {
        id: ctx.rec.client_id(),
        client: client(&ctx.addrs[node]).await?,
    })
}

/// Pause after an operation: the think time, longer after a refused connection so a client of
/// a dead node does not spin.
async fn pause_after(rng: &mut StdRng, ctx: &Ctx, op: &Op) {
    let think = if ctx.think.is_zero() {
        Duration::ZERO
    } else {
        rng.random_range(Duration::ZERO..=ctx.think)
    };
    let extra = if op.outcome == Outcome::Fail {
        Duration::from_millis(200)
    } else {
        Duration::ZERO
    };
    tokio::time::sleep(think + extra).await;
}

/// A register client on node `node`: random get / put / cas on `keys` keys until `stop`.
/// Returns the number of operations it recorded.
pub async fn register_client(
    ctx: Ctx,
    worker: usize,
    node: usize,
    keys: usize,
    stop: CancellationToken,
) -> anyhow::Result<usize> {
    let mut rng = StdRng::seed_from_u64(ctx.seed ^ (worker as u64 + 1).wrapping_mul(0x9e37));
    let mut s = session(&ctx, node).await?;
    // The last value this client saw per key, as the expected value for a swap.
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut count = 0;
    while !stop.is_cancelled() {
        let key = format!("{REGISTER_PREFIX}{}", rng.random_range(0..keys));
        let roll: f64 = rng.random();
        let known = last.get(&key).copied();
        let (op, args) = match (roll, known) {
            (r, _) if r < 0.5 => (
                OpKind::Get,
                Args {
                    key: key.clone(),
                    value: None,
                    expect: None,
                },
            ),
            (r, Some(expect)) if r < 0.75 => (
                OpKind::Cas,
                Args {
                    key: key.clone(),
                    value: Some(ctx.rec.unique_value()),
                    expect: Some(expect),
                },
            ),
            _ => (
                OpKind::Put,
                Args {
                    key: key.clone(),
                    value: Some(ctx.rec.unique_value()),
                    expect: None,
                },
            ),
        };
        let done = execute(&ctx, &mut s.client, s.id, Some(node), op, args).await;
        count += 1;
        match (done.outcome, done.op) {
            (Outcome::Ok, OpKind::Get) => {
                if let Some(v) = done.result.as_ref().and_then(|r| r.value) {
                    last.insert(key, v);
                }
            }
            (Outcome::Ok, OpKind::Put) => {
                last.insert(key, done.args.value.unwrap_or_default());
            }
            (Outcome::Ok, OpKind::Cas) => {
                if done.result.as_ref().and_then(|r| r.succeeded) == Some(true) {
                    last.insert(key, done.args.value.unwrap_or_default());
                }
            }
            (Outcome::Unknown, _) => s = session(&ctx, node).await?,
            (Outcome::Fail, _) => {}
        }
        pause_after(&mut rng, &ctx, &done).await;
    }
    Ok(count)
}

/// A durability writer on node `node`: puts fresh keys `/jepsen/d/<worker>/<seq>` until `stop`.
pub async fn durability_writer(
    ctx: Ctx,
    worker: usize,
    node: usize,
    stop: CancellationToken,
) -> anyhow::Result<usize> {
    let mut rng = StdRng::seed_from_u64(ctx.seed ^ (worker as u64 + 1000).wrapping_mul(0x9e37));
    let mut s = session(&ctx, node).await?;
    let mut seq = 0u64;
    while !stop.is_cancelled() {
        let args = Args {
            key: format!("{DURABLE_PREFIX}{worker}/{seq:06}"),
            value: Some(ctx.rec.unique_value()),
            expect: None,
        };
        seq += 1;
        let done = execute(&ctx, &mut s.client, s.id, Some(node), OpKind::Put, args).await;
        if done.outcome == Outcome::Unknown {
            s = session(&ctx, node).await?;
        }
        pause_after(&mut rng, &ctx, &done).await;
    }
    Ok(seq as usize)
}

/// A watcher: watches [`ROOT`] from revision 1, resumes after every error and also on purpose
/// every few seconds on another node, always from one past the last event it received. Stops
/// once it has received revision `target` (set at the end of the run) or on `abort`.
pub async fn watcher(
    ctx: Ctx,
    id: usize,
    target: watch::Receiver<Option<i64>>,
    abort: CancellationToken,
) -> WatcherLog {
    let mut rng = StdRng::seed_from_u64(ctx.seed ^ (id as u64 + 2000).wrapping_mul(0x9e37));
    let mut log = WatcherLog {
        watcher: id,
        ..Default::default()
    };
    let mut target = target;
    let mut next: i64 = 1;
    let mut node = id % ctx.addrs.len();
    let mut reason: Option<String> = None;
    let reached = |next: i64, t: &Option<i64>| t.is_some_and(|t| next > t);
    loop {
        if abort.is_cancelled() || reached(next, &target.borrow()) {
            return log;
        }
        log.resumes.push(Resume {
            time: ctx.rec.now(),
            from_revision: next,
            node,
            reason: reason.take(),
        });
        let stream = async {
            let mut c = client(&ctx.addrs[node]).await?;
            let opts = WatchOptions::new().with_prefix().with_start_revision(next);
            anyhow::Ok(c.watch(ROOT, Some(opts)).await?)
        };
        let mut stream = match tokio::time::timeout(ctx.op_timeout, stream).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                reason = Some(format!("could not start: {e:#}"));
                node = (node + 1) % ctx.addrs.len();
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(_) => {
                reason = Some("watch start timed out".into());
                node = (node + 1) % ctx.addrs.len();
                continue;
            }
        };
        // Resume on purpose after a while, on the next node.
        let lifetime = tokio::time::sleep(Duration::from_millis(rng.random_range(2000..6000)));
        tokio::pin!(lifetime);
        loop {
            tokio::select! {
                _ = abort.cancelled() => return log,
                _ = &mut lifetime => {
                    reason = Some("resumed on purpose".into());
                    break;
                }
                changed = target.changed() => {
                    if changed.is_err() || reached(next, &target.borrow()) {
                        return log;
                    }
                }
                msg = stream.message() => match msg {
                    Ok(Some(resp)) => {
                        if resp.canceled() {
                            reason = Some(format!(
                                "canceled by server: {} (compact revision {})",
                                resp.cancel_reason(),
                                resp.compact_revision()
                            ));
                            break;
                        }
                        let now = ctx.rec.now();
                        for e in resp.events() {
                            let Some(kv) = e.kv() else { continue };
                            let value = match e.event_type() {
                                EventType::Put => parse(kv.value()),
                                EventType::Delete => None,
                            };
                            log.events.push(WatchEvent {
                                revision: kv.mod_revision(),
                                key: String::from_utf8_lossy(kv.key()).into_owned(),
                                value,
                                time: now,
                            });
                            next = next.max(kv.mod_revision() + 1);
                        }
                        if reached(next, &target.borrow()) {
                            return log;
                        }
                    }
                    Ok(None) => {
                        reason = Some("stream closed by server".into());
                        break;
                    }
                    Err(e) => {
                        reason = Some(format!("stream error: {e}"));
                        break;
                    }
                }
            }
        }
        node = (node + 1) % ctx.addrs.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(s: tonic::Status) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(s)
    }

    #[test]
    fn only_provably_unsent_or_rejected_requests_fail() {
        use tonic::Status;
        assert_eq!(
            classify(&status(Status::unavailable("tcp connect error"))),
            Outcome::Fail
        );
        assert_eq!(
            classify(&status(Status::invalid_argument("key is larger than 4096"))),
            Outcome::Fail
        );
        // A follower quoting its own failed forward: the write may have reached the leader.
        assert_eq!(
            classify(&status(Status::unavailable(
                "leader 2 is unreachable: tcp connect error: Connection refused"
            ))),
            Outcome::Unknown
        );
        assert_eq!(
            classify(&status(Status::unavailable("etcdserver: no leader"))),
            Outcome::Unknown
        );
        assert_eq!(
            classify(&status(Status::unknown("transport error"))),
            Outcome::Unknown
        );
        assert_eq!(
            classify(&status(Status::deadline_exceeded("timeout"))),
            Outcome::Unknown
        );
    }
}
