//! center's side of the cluster: session lookups in register (batched per slot owner, routed by
//! the slot map) and calls to rooms (Push, Broadcast, Kick) with flow control per room.
//!
//! Lookups and pushes of concurrent requests are merged per destination ([`Lane`]): under load,
//! one `LookupBatch` per register and one `Push` per room carry many senders' work.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::time::Duration;

use longlink_common::SlotMap;
use longlink_common::slot_of;
use longlink_proto::OneWrite;
use longlink_proto::registerpb;
use longlink_proto::registerpb::register_client::RegisterClient;
use longlink_proto::roompb;
use longlink_proto::roompb::room_client::RoomClient;
use tokio::sync::Semaphore;
use tokio::sync::watch;
use tonic::transport::Endpoint;

use crate::coalesce::Lane;
use crate::coalesce::Limits;
use crate::config::FanoutConfig;
use crate::config::Live;
use crate::error::Error;
use crate::error::Result;
use crate::rooms::Rooms;

/// Live registers: instance id -> gRPC address.
pub type Registers = watch::Receiver<Arc<BTreeMap<String, String>>>;
/// The slot map from `/register/slots`.
pub type Slots = watch::Receiver<Arc<SlotMap>>;

/// How many times a lookup is re-routed (wrong owner) or retried (slot rebuilding) before its
/// users are reported as unknown.
const LOOKUP_ROUNDS: u32 = 5;

/// Users per merged `LookupBatch` (a register accepts up to `max_batch`, 10 000 by default).
const LOOKUP_BATCH_USERS: usize = 2_000;
/// Items per merged room `Push`.
const PUSH_BATCH_ITEMS: usize = 2_000;
/// Payload bytes per room `Push`: larger pushes are split, far below what a room decodes.
const PUSH_BATCH_BYTES: usize = 1 << 20;
/// What one push item weighs besides its payload (ids, app, user, framing), for the bound above.
const PUSH_ITEM_OVERHEAD: usize = 64;

type LookupLane = Lane<registerpb::User, registerpb::LookupResponse>;
type PushLane = Lane<roompb::PushItem, u32>;

/// The answer for one user.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// Authoritative: these are the user's sessions (none = offline).
    Sessions(Vec<registerpb::Session>),
    /// No authoritative answer now (register failing over, unreachable); says why.
    Unknown(String),
}

/// Flow control for one room: `room_inflight` calls at once, at most `room_waiters` waiting.
struct Gate {
    permits: Semaphore,
    /// Callers waiting for a permit; past the cap a call fails fast instead of queueing.
    waiting: AtomicUsize,
}

/// A channel to a register or room; unary calls go out in one write (`OneWrite`).
type Channel = OneWrite<tonic::transport::Channel>;

/// Clients toward registers and rooms. Channels are created lazily and kept per address.
pub struct Fabric {
    config: Arc<Live<FanoutConfig>>,
    rooms: Rooms,
    registers: Registers,
    slots: Slots,
    /// gRPC channels by address; held only to clone a channel, never across an await.
    channels: Mutex<HashMap<String, Channel>>,
    /// Per-room gates by room id; rooms that left discovery are pruned when new ones appear.
    gates: Mutex<HashMap<String, Arc<Gate>>>,
    /// Merged lookups by (register id, address, slot-map epoch).
    lookup_lanes: Mutex<HashMap<(String, String, u64), LookupLane>>,
    /// Merged pushes by (room id, address).
    push_lanes: Mutex<HashMap<(String, String), PushLane>>,
}

impl Fabric {
    pub fn new(config: FanoutConfig, rooms: Rooms, registers: Registers, slots: Slots) -> Fabric {
        Fabric {
            config: Arc::new(Live::new(config)),
            rooms,
            registers,
            slots,
            channels: Mutex::new(HashMap::new()),
            gates: Mutex::new(HashMap::new()),
            lookup_lanes: Mutex::new(HashMap::new()),
            push_lanes: Mutex::new(HashMap::new()),
        }
    }

    /// Applies new flow-control settings. When a queue size changes, the queues start over
    /// with it: calls already queued finish on the old ones.
    pub fn set_config(&self, config: FanoutConfig) {
        let old = self.config.get();
        let sizes = |c: &FanoutConfig| (c.room_inflight, c.room_waiters, c.register_inflight);
        if sizes(&old) != sizes(&config) {
            self.gates.lock().unwrap_or_else(|p| p.into_inner()).clear();
            self.push_lanes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            self.lookup_lanes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
        self.config.set(config);
    }

    fn rpc_timeout(&self) -> Duration {
        Duration::from_millis(self.config.get().rpc_timeout_ms)
    }

    fn channel(&self, addr: &str) -> Result<Channel> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let uri = if addr.contains("://") {
            addr.to_owned()
        } else {
            format!("http://{addr}")
        };
        let channel = Endpoint::from_shared(uri)
            .map_err(|e| Error::Internal(format!("bad address {addr:?}: {e}")))?
            .connect_timeout(self.rpc_timeout())
            .tcp_nodelay(true)
            .connect_lazy();
        let channel = OneWrite::new(channel);
        channels.insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }

    /// Looks up the sessions of `users` of `app`; `result[i]` answers `users[i]`.
    ///
    /// Users are grouped by the owner of their slot (one `LookupBatch` per register), answers
    /// `WRONG_OWNER` are re-sent to the owner named in the answer, and `UNAVAILABLE` (slot
    /// rebuilding) is retried with backoff: a failover must not turn online users offline.
    pub async fn lookup(&self, app: &str, users: &[String]) -> Vec<Lookup> {
        let mut results: Vec<Option<Lookup>> = vec![None; users.len()];
        let mut why: Vec<String> = vec![String::new(); users.len()];
        // Routing hint from a WRONG_OWNER answer: (owner, epoch), preferred over our map.
        let mut hints: HashMap<usize, (String, u64)> = HashMap::new();
        for round in 0..LOOKUP_ROUNDS {
            if round > 0 {
                // Every user answered in the previous round: done, without the backoff.
                if results.iter().all(Option::is_some) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25 << round.min(5))).await;
            }
            let map = self.slots.borrow().clone();
            let mut groups: BTreeMap<(String, u64), Vec<usize>> = BTreeMap::new();
            for (i, user) in users.iter().enumerate() {
                if results[i].is_some() {
                    continue;
                }
                let route = hints.remove(&i).unwrap_or_else(|| {
                    let owner = map.owner(slot_of(app, user)).unwrap_or_default();
                    (owner.to_owned(), map.epoch)
                });
                if route.0.is_empty() {
                    why[i] = format!("slot {} has no register owner", slot_of(app, user));
                    continue;
                }
                groups.entry(route).or_default().push(i);
            }
            if groups.is_empty() {
                continue;
            }
            let calls = groups.into_iter().map(|((owner, epoch), idx)| {
                let batch: Vec<registerpb::User> = idx
                    .iter()
                    .map(|&i| registerpb::User {
                        app: app.to_owned(),
                        user: users[i].clone(),
                    })
                    .collect();
                async move {
                    let answer = self.lookup_batch(&owner, epoch, batch).await;
                    (owner, epoch, idx, answer)
                }
            });
            for (owner, epoch, idx, answer) in futures::future::join_all(calls).await {
                // One answer per user: the lane refuses a short answer as an error.
                let answers = match answer {
                    Ok(a) => a,
                    Err(e) => {
                        idx.iter().for_each(|&i| why[i] = e.to_string());
                        continue;
                    }
                };
                for (&i, answer) in idx.iter().zip(answers) {
                    let result = answer.result.unwrap_or_default();
                    match registerpb::Status::try_from(result.status) {
                        Ok(registerpb::Status::Ok) => {
                            results[i] = Some(Lookup::Sessions(answer.sessions));
                        }
                        Ok(registerpb::Status::WrongOwner) => {
                            why[i] =
                                format!("register {owner}: wrong owner at epoch {}", result.epoch);
                            // Another owner, or this one at a newer epoch (it got the slot
                            // after our map): go where the answer points.
                            let newer = result.owner != owner || result.epoch > epoch;
                            if !result.owner.is_empty() && newer {
                                hints.insert(i, (result.owner, result.epoch));
                            }
                        }
                        Ok(registerpb::Status::Invalid) => {
                            results[i] = Some(Lookup::Unknown(format!(
                                "register refused the user: {}",
                                result.message
                            )));
                        }
                        Ok(registerpb::Status::Unavailable) | Err(_) => {
                            why[i] = format!("register {owner}: unavailable: {}", result.message);
                        }
                    }
                }
            }
        }
        results
            .into_iter()
            .zip(why)
            .map(|(r, why)| r.unwrap_or(Lookup::Unknown(why)))
            .collect()
    }

    async fn lookup_batch(
        &self,
        owner: &str,
        epoch: u64,
        users: Vec<registerpb::User>,
    ) -> Result<Vec<registerpb::LookupResponse>> {
        let addr = self
            .registers
            .borrow()
            .get(owner)
            .cloned()
            .ok_or_else(|| Error::Unavailable(format!("register {owner} is not live")))?;
        let lane = self.lookup_lane(owner, &addr, epoch)?;
        let chunks = users
            .chunks(LOOKUP_BATCH_USERS)
            .map(|c| lane.call(c.to_vec(), 0));
        let mut results = Vec::with_capacity(users.len());
        for answer in futures::future::join_all(chunks).await {
            results.extend(answer?);
        }
        Ok(results)
    }

    fn lookup_lane(&self, owner: &str, addr: &str, epoch: u64) -> Result<LookupLane> {
        let key = (owner.to_owned(), addr.to_owned(), epoch);
        let mut lanes = self.lookup_lanes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lane) = lanes.get(&key) {
            return Ok(lane.clone());
        }
        if lanes.len() >= 16 {
            // Lanes of registers that left, or of older slot maps, end once their queue drains.
            let live = self.registers.borrow().clone();
            let current = self.slots.borrow().epoch;
            lanes.retain(|(id, addr, epoch), _| {
                *epoch == current && live.get(id).is_some_and(|a| a == addr)
            });
        }
        let channel = self.channel(addr)?;
        let config = self.config.clone();
        let name = format!("register {owner}");
        let limits = Limits {
            inflight: config.get().register_inflight,
            queue: config.get().room_waiters,
            max_items: LOOKUP_BATCH_USERS,
            max_weight: usize::MAX,
        };
        let lane = Lane::spawn(name.clone(), limits, move |users| {
            let mut client = RegisterClient::new(channel.clone());
            let timeout = Duration::from_millis(config.get().rpc_timeout_ms);
            let name = name.clone();
            async move {
                let request = registerpb::LookupBatchRequest { epoch, users };
                let answer = answer(&name, timeout, client.lookup_batch(request)).await?;
                Ok(answer.results)
            }
        });
        lanes.insert(key, lane.clone());
        Ok(lane)
    }

    /// Pushes `items` to room `room_id`, merged with other senders' items bound for the same room
    /// (at most `room_inflight` `Push` calls in flight, `room_waiters` jobs waiting); answers the
    /// connections reached per item. Items whose payloads add up to more than 1 MiB are split
    /// over several calls.
    pub async fn push(&self, room_id: &str, items: Vec<roompb::PushItem>) -> Result<Vec<u32>> {
        let addr = self.room_addr(room_id)?;
        let lane = self.push_lane(room_id, &addr)?;
        let weight = |item: &roompb::PushItem| {
            PUSH_ITEM_OVERHEAD + item.message.as_ref().map_or(0, |m| m.payload.len())
        };
        let mut chunks: Vec<(Vec<roompb::PushItem>, usize)> = vec![];
        for item in items {
            let w = weight(&item);
            match chunks.last_mut() {
                Some((chunk, total))
                    if *total + w <= PUSH_BATCH_BYTES && chunk.len() < PUSH_BATCH_ITEMS =>
                {
                    chunk.push(item);
                    *total += w;
                }
                _ => chunks.push((vec![item], w)),
            }
        }
        let calls = chunks
            .into_iter()
            .map(|(chunk, weight)| lane.call(chunk, weight));
        let mut delivered = vec![];
        for answer in futures::future::join_all(calls).await {
            delivered.extend(answer?);
        }
        Ok(delivered)
    }

    fn push_lane(&self, room_id: &str, addr: &str) -> Result<PushLane> {
        let key = (room_id.to_owned(), addr.to_owned());
        let mut lanes = self.push_lanes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lane) = lanes.get(&key) {
            return Ok(lane.clone());
        }
        let live = self.rooms.borrow().clone();
        if lanes.len() >= 2 * live.len().max(8) {
            lanes.retain(|(id, addr), _| {
                live.iter()
                    .any(|r| &r.id == id && r.grpc.as_deref() == Some(addr.as_str()))
            });
        }
        let channel = self.channel(addr)?;
        let config = self.config.clone();
        let name = format!("room {room_id}");
        let limits = Limits {
            inflight: config.get().room_inflight,
            queue: config.get().room_waiters,
            max_items: PUSH_BATCH_ITEMS,
            max_weight: PUSH_BATCH_BYTES,
        };
        let lane = Lane::spawn(name.clone(), limits, move |items| {
            let mut client = RoomClient::new(channel.clone());
            let timeout = Duration::from_millis(config.get().rpc_timeout_ms);
            let name = name.clone();
            async move {
                let n = items.len();
                let request = roompb::PushRequest { items };
                let answer = answer(&name, timeout, client.push(request)).await?;
                Ok(per_item(answer, n))
            }
        });
        lanes.insert(key, lane.clone());
        Ok(lane)
    }

    fn room_addr(&self, room_id: &str) -> Result<String> {
        self.rooms
            .borrow()
            .iter()
            .find(|r| r.id == room_id)
            .and_then(|r| r.grpc.clone())
            .ok_or_else(|| Error::Unavailable(format!("room {room_id} is not live")))
    }

    fn gate(&self, room_id: &str) -> Arc<Gate> {
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(g) = gates.get(room_id) {
            return g.clone();
        }
        let live = self.rooms.borrow().clone();
        if gates.len() >= 2 * live.len().max(8) {
            gates.retain(|id, _| live.iter().any(|r| &r.id == id));
        }
        let gate = Arc::new(Gate {
            permits: Semaphore::new(self.config.get().room_inflight.max(1)),
            waiting: AtomicUsize::new(0),
        });
        gates.insert(room_id.to_owned(), gate.clone());
        gate
    }

    /// Calls room `room_id` through its gate: waits for one of `room_inflight` slots (failing
    /// fast when `room_waiters` callers already wait), then runs `call` with the RPC timeout.
    pub async fn with_room<T, F, Fut>(&self, room_id: &str, call: F) -> Result<T>
    where
        F: FnOnce(RoomClient<Channel>) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let addr = self.room_addr(room_id)?;
        let gate = self.gate(room_id);
        let waiters = self.config.get().room_waiters;
        if gate.waiting.fetch_add(1, Ordering::AcqRel) >= waiters {
            gate.waiting.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!("center_room_overload_total").increment(1);
            return Err(Error::Unavailable(format!(
                "room {room_id} has {waiters} calls waiting (fanout.room_waiters); retry later"
            )));
        }
        let permit = gate.permits.acquire().await;
        gate.waiting.fetch_sub(1, Ordering::AcqRel);
        let _permit = permit.map_err(|_| Error::Internal("room gate closed".into()))?;
        let client = RoomClient::new(self.channel(&addr)?);
        answer(&format!("room {room_id}"), self.rpc_timeout(), call(client)).await
    }
}

/// Awaits one RPC to `name` for at most `timeout`; a failure is `Unavailable` and names `name`.
async fn answer<T>(
    name: &str,
    timeout: Duration,
    call: impl Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(resp)) => Ok(resp.into_inner()),
        Ok(Err(status)) => Err(Error::Unavailable(format!("{name}: {}", status.message()))),
        Err(_) => Err(Error::Unavailable(format!(
            "{name}: no answer within {timeout:?}"
        ))),
    }
}

/// The connections reached per item of a room `Push` answer. A room that predates `per_item`
/// answers only the total: it is counted on the first item, so totals stay right while a
/// center is upgraded before its rooms.
fn per_item(resp: roompb::PushResponse, items: usize) -> Vec<u32> {
    if resp.per_item.len() == items {
        return resp.per_item;
    }
    let mut counts = vec![0; items];
    if let Some(first) = counts.first_mut() {
        *first = resp.delivered;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_item_counts_split_the_answer_and_survive_an_older_room() {
        let answer = roompb::PushResponse {
            delivered: 3,
            per_item: vec![2, 0, 1],
            ..Default::default()
        };
        assert_eq!(per_item(answer, 3), vec![2, 0, 1]);
        let older = roompb::PushResponse {
            delivered: 3,
            ..Default::default()
        };
        assert_eq!(per_item(older, 3), vec![3, 0, 0]);
    }
}
