//! The recorded history of one run: client operations and nemesis events, one JSON object per
//! line (`history.jsonl`), written as they happen so a crashed harness still leaves evidence.

use std::io::BufRead;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde::Deserialize;
use serde::Serialize;

/// How an operation ended, as far as the client can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The server acknowledged it; `result` holds what it answered.
    Ok,
    /// It certainly did not take effect (rejected, or never left the client).
    Fail,
    /// It may or may not have taken effect (timeout, connection lost after sending). The client
    /// id that issued it is retired: its operation stays open for ever.
    Unknown,
}

/// What a client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    Get,
    Put,
    /// Compare-and-swap: a Txn `value(key) == expect` then `put(key, value)`.
    Cas,
}

/// Arguments of an operation. Values are unique per run (a global counter), so a value read
/// names the write that produced it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Args {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<u64>,
}

/// What the server answered for an `ok` operation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpResult {
    /// Value read (`get`): `None` when the key does not exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<u64>,
    /// Whether a `cas` swapped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub succeeded: Option<bool>,
    /// Store revision in the response header (for a write: the revision it created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
}

/// One client operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// Client id; one operation in flight per id, and an `unknown` outcome retires the id.
    pub client: u64,
    pub op: OpKind,
    pub args: Args,
    /// Nanoseconds since the run started, taken just before sending.
    pub call_time: u64,
    /// Nanoseconds since the run started, taken when the answer arrived (or, for `unknown`, when
    /// the client gave up: the operation itself may take effect later).
    pub return_time: u64,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<OpResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The node slot the client talked to (`None` for any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<usize>,
}

/// A fault injected or healed, or another harness event worth seeing next to the operations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NemesisEvent {
    pub time: u64,
    /// `partition`, `kill`, `pause`, `member`, `heal-all`, `phase`...
    pub fault: String,
    /// `start`, `heal`, or `info`.
    pub action: String,
    pub detail: String,
}

/// A line of `history.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Entry {
    Op(Op),
    Nemesis(NemesisEvent),
    /// A register-workload request (`jepsen-tests register`).
    Session(SessionOp),
    /// A slot map or register instance seen in the keeper (`jepsen-tests register`).
    Keeper(KeeperEvent),
    /// A push through center (`jepsen-tests push`).
    Push(PushOp),
    /// A device connecting, disconnecting or receiving (`jepsen-tests push`).
    Device(DeviceEvent),
}

/// What a register-workload request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionOpKind {
    Attach,
    Detach,
    /// Replace a room's sessions in a slot (a write, like attach and detach).
    Sync,
    Lookup,
}

/// One request of a test room (attach, detach, sync) or of a lookup client to a register.
///
/// `outcome` follows the keeper workload: `ok` means the register answered `OK` (the write is
/// applied, the lookup authoritative); `fail` means it certainly did nothing (another status, or
/// the connection was refused); `unknown` means it may have been applied (timeout, lost
/// connection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionOp {
    pub client: u64,
    pub op: SessionOpKind,
    /// The test room that sent it (empty for lookups).
    #[serde(default)]
    pub room: String,
    #[serde(default)]
    pub user: String,
    /// Connection id within `room` (attach, detach).
    #[serde(default)]
    pub conn_id: u64,
    pub slot: u16,
    /// The register instance the request went to.
    pub register: String,
    /// The slot-map epoch the caller routed by.
    pub epoch: u64,
    pub call_time: u64,
    pub return_time: u64,
    pub outcome: Outcome,
    /// The register's status: `ok`, `wrong_owner`, `unavailable`, `invalid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// The epoch of the register's own map when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_epoch: Option<u64>,
    /// Lookup: the sessions found, as `room/conn_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub found: Option<Vec<String>>,
    /// Lookup: the slot was rebuilding (the answer may be partial).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rebuilding: bool,
    /// Sync: how many sessions were sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A change seen by the harness's watch on the keeper: a new slot map, or a register instance
/// key appearing or disappearing. `revision` orders them exactly; `time` is when the harness saw
/// it (never before it happened).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeeperEvent {
    pub time: u64,
    pub revision: i64,
    /// `Some` for a slot map (`/register/slots`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map: Option<MapRecord>,
    /// `Some((id, present))` for `/instances/register/{id}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<(String, bool)>,
}

/// A slot map: `epoch` and the owner of every slot, run-length encoded as `(owner, count)`
/// (a map is a few long runs, so a history line stays short).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapRecord {
    pub epoch: u64,
    pub runs: Vec<(String, u16)>,
}

impl MapRecord {
    /// Encodes `slots[s]` = owner of slot `s`.
    pub fn encode(epoch: u64, slots: &[String]) -> Self {
        let mut runs: Vec<(String, u16)> = Vec::new();
        for o in slots {
            match runs.last_mut() {
                Some((last, n)) if last == o => *n += 1,
                _ => runs.push((o.clone(), 1)),
            }
        }
        Self { epoch, runs }
    }

    /// The owner of every slot.
    pub fn decode(&self) -> Vec<String> {
        self.runs
            .iter()
            .flat_map(|(o, n)| std::iter::repeat_n(o.clone(), usize::from(*n)))
            .collect()
    }
}

/// One push through center's HTTP API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushOp {
    pub client: u64,
    pub user: String,
    /// The unique value in the payload (`{"k": key, "to": user}`).
    pub key: u64,
    pub call_time: u64,
    pub return_time: u64,
    /// `ok`: 200; `fail`: refused (connection refused, 4xx, 5xx); `unknown`: no answer.
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// center's answer for an `ok` push.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<PushAnswer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The counters of center's push answer (docs/api.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PushAnswer {
    pub id: String,
    pub sessions: u64,
    pub users_online: u64,
    pub users_offline: u64,
    pub users_unknown: u64,
    pub retrying: u64,
}

/// What happened to a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum DeviceWhat {
    /// `welcome` received. `incarnation` counts restarts of the room process (read after the
    /// welcome, so a kill racing it can only make it larger).
    Connected {
        room: String,
        conn_id: u64,
        incarnation: u32,
        resumed: u32,
    },
    /// The connection ended (closed by the room, error, or no pong in time).
    Disconnected { reason: String },
    /// A message arrived (and was acked). `to` and `key` come from the payload.
    Received {
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
        qos: u32,
    },
}

/// A device's event; a device is one user's one device and holds one connection at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEvent {
    pub time: u64,
    pub user: String,
    #[serde(flatten)]
    pub what: DeviceWhat,
}

/// Collects the history of a run in memory and appends every entry to `history.jsonl` and
/// nemesis events also to `nemesis.log`. Clients wait for the lock (never drop an entry): the
/// history is the evidence, and recording costs microseconds next to a network round trip.
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<Mutex<RecorderInner>>,
    start: Instant,
    next_client: Arc<AtomicU64>,
    next_value: Arc<AtomicU64>,
}

struct RecorderInner {
    entries: Vec<Entry>,
    history: Option<std::io::BufWriter<std::fs::File>>,
    nemesis: Option<std::fs::File>,
}

impl Recorder {
    /// Writes into `dir/history.jsonl` and `dir/nemesis.log`.
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        let history = std::fs::File::create(dir.join("history.jsonl"))?;
        let nemesis = std::fs::File::create(dir.join("nemesis.log"))?;
        Ok(Self::with_files(
            Some(std::io::BufWriter::new(history)),
            Some(nemesis),
        ))
    }

    /// Keeps the history in memory only (tests).
    pub fn in_memory() -> Self {
        Self::with_files(None, None)
    }

    fn with_files(
        history: Option<std::io::BufWriter<std::fs::File>>,
        nemesis: Option<std::fs::File>,
    ) -> Self {
        Self {
            inner: Arc::new(Mutex::new(RecorderInner {
                entries: Vec::new(),
                history,
                nemesis,
            })),
            start: Instant::now(),
            next_client: Arc::new(AtomicU64::new(0)),
            next_value: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Nanoseconds since the run started.
    pub fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// A fresh client id (a retired id is never reused).
    pub fn client_id(&self) -> u64 {
        self.next_client.fetch_add(1, Ordering::Relaxed)
    }

    /// A value no other write of this run carries.
    pub fn unique_value(&self) -> u64 {
        self.next_value.fetch_add(1, Ordering::Relaxed)
    }

    pub fn op(&self, op: Op) {
        self.push(Entry::Op(op));
    }

    /// Records any entry (the register and push workloads' kinds).
    pub fn entry(&self, entry: Entry) {
        self.push(entry);
    }

    pub fn nemesis(&self, fault: &str, action: &str, detail: impl Into<String>) {
        let event = NemesisEvent {
            time: self.now(),
            fault: fault.to_string(),
            action: action.to_string(),
            detail: detail.into(),
        };
        eprintln!(
            "  [{:>7.2}s] {} {}: {}",
            event.time as f64 / 1e9,
            event.fault,
            event.action,
            event.detail
        );
        self.push(Entry::Nemesis(event));
    }

    fn push(&self, entry: Entry) {
        let mut inner = self.inner.lock().expect("recorder lock");
        let inner = &mut *inner;
        if let Some(w) = inner.history.as_mut() {
            let line = serde_json::to_string(&entry).expect("history entries serialize");
            let _ = writeln!(w, "{line}");
        }
        if let (Entry::Nemesis(e), Some(f)) = (&entry, inner.nemesis.as_mut()) {
            let _ = writeln!(
                f,
                "{:>10.3}s {:<10} {:<5} {}",
                e.time as f64 / 1e9,
                e.fault,
                e.action,
                e.detail
            );
        }
        inner.entries.push(entry);
    }

    pub fn flush(&self) {
        let mut inner = self.inner.lock().expect("recorder lock");
        if let Some(w) = inner.history.as_mut() {
            let _ = w.flush();
        }
    }

    /// A copy of everything recorded so far.
    pub fn entries(&self) -> Vec<Entry> {
        self.inner.lock().expect("recorder lock").entries.clone()
    }
}

/// The operations of a history, in the order they were recorded.
pub fn ops(entries: &[Entry]) -> Vec<Op> {
    entries
        .iter()
        .filter_map(|e| match e {
            Entry::Op(op) => Some(op.clone()),
            _ => None,
        })
        .collect()
}

/// Reads a `history.jsonl` back (for `jepsen-tests check`).
pub fn load(path: &Path) -> anyhow::Result<Vec<Entry>> {
    let file = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    let mut entries = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let entry = serde_json::from_str(&line)
            .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), n + 1))?;
        entries.push(entry);
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_through_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let rec = Recorder::create(dir.path()).unwrap();
        rec.op(Op {
            client: 3,
            op: OpKind::Cas,
            args: Args {
                key: "k".into(),
                value: Some(7),
                expect: Some(5),
            },
            call_time: 10,
            return_time: 20,
            outcome: Outcome::Ok,
            result: Some(OpResult {
                succeeded: Some(true),
                revision: Some(9),
                ..Default::default()
            }),
            error: None,
            node: Some(1),
        });
        rec.nemesis("partition", "start", "[1] | [2, 3]");
        rec.flush();
        let back = load(&dir.path().join("history.jsonl")).unwrap();
        assert_eq!(back, rec.entries());
        let text = std::fs::read_to_string(dir.path().join("history.jsonl")).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        for field in [
            "client",
            "op",
            "args",
            "call_time",
            "return_time",
            "outcome",
        ] {
            assert!(first.get(field).is_some(), "missing {field}: {first}");
        }
        let log = std::fs::read_to_string(dir.path().join("nemesis.log")).unwrap();
        assert!(log.contains("partition") && log.contains("[1] | [2, 3]"));
    }

    #[test]
    fn register_and_push_entries_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let rec = Recorder::create(dir.path()).unwrap();
        let owners: Vec<String> = (0..1024)
            .map(|s| if s < 500 { "r1" } else { "r2" }.to_string())
            .collect();
        let map = MapRecord::encode(7, &owners);
        assert_eq!(map.runs.len(), 2);
        assert_eq!(map.decode(), owners);
        rec.entry(Entry::Keeper(KeeperEvent {
            time: 1,
            revision: 9,
            map: Some(map),
            instance: None,
        }));
        rec.entry(Entry::Session(SessionOp {
            client: 1,
            op: SessionOpKind::Lookup,
            room: String::new(),
            user: "u1".into(),
            conn_id: 0,
            slot: 3,
            register: "r1".into(),
            epoch: 7,
            call_time: 2,
            return_time: 3,
            outcome: Outcome::Ok,
            status: Some("ok".into()),
            answer_epoch: Some(7),
            found: Some(vec!["room-a/4".into()]),
            rebuilding: true,
            sessions: None,
            error: None,
        }));
        rec.entry(Entry::Device(DeviceEvent {
            time: 4,
            user: "u1".into(),
            what: DeviceWhat::Received {
                id: "m-1".into(),
                key: Some(5),
                to: Some("u1".into()),
                qos: 1,
            },
        }));
        rec.entry(Entry::Push(PushOp {
            client: 2,
            user: "u1".into(),
            key: 5,
            call_time: 1,
            return_time: 2,
            outcome: Outcome::Ok,
            http_status: Some(200),
            answer: Some(PushAnswer {
                sessions: 1,
                ..Default::default()
            }),
            error: None,
        }));
        rec.flush();
        let back = load(&dir.path().join("history.jsonl")).unwrap();
        assert_eq!(back, rec.entries());
        let text = std::fs::read_to_string(dir.path().join("history.jsonl")).unwrap();
        assert!(
            text.contains(r#""type":"device","time":4,"user":"u1","event":"received""#),
            "{text}"
        );
    }
}
