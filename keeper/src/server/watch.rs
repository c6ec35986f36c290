//! etcd `Watch` service: many watches per stream, each resumable from a revision.
//!
//! Watches read the node's own event history after every applied batch, so a slow watcher never
//! makes the others wait or lose events: it simply reads further back in the history. A watcher
//! that falls behind the retained history is cancelled with the compact revision, as etcd does.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use futures::Stream;
use futures::StreamExt;
use longlink_proto::etcdserverpb::WatchCreateRequest;
use longlink_proto::etcdserverpb::WatchRequest;
use longlink_proto::etcdserverpb::WatchResponse;
use longlink_proto::etcdserverpb::watch_create_request::FilterType;
use longlink_proto::etcdserverpb::watch_request::RequestUnion;
use longlink_proto::etcdserverpb::watch_server::Watch;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Request;
use tonic::Response;
use tonic::Status;
use tonic::Streaming;

use super::Keeper;
use crate::limits;
use crate::pb_impl::event_to_pb;
use crate::store::EventKind;
use crate::store::StoreError;

/// Events read from the history per step; a revision is never split.
const EVENTS_PER_READ: usize = 1_000;
/// Responses buffered per stream before watchers wait for the client.
const STREAM_BUFFER: usize = 64;
/// The watch id etcd uses for stream-wide progress responses.
const PROGRESS_WATCH_ID: i64 = -1;

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

/// One watch's position: every event before `synced` has been sent.
struct WatchSlot {
    cancel: CancellationToken,
    synced: Arc<std::sync::atomic::AtomicI64>,
}

#[tonic::async_trait]
impl Watch for Keeper {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<WatchStream>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let keeper = self.self_arc();
        tokio::spawn(serve_stream(keeper, request.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

async fn serve_stream(
    keeper: Arc<Keeper>,
    mut inbound: Streaming<WatchRequest>,
    tx: mpsc::Sender<Result<WatchResponse, Status>>,
) {
    let stream_cancel = keeper.shutdown.child_token();
    let watches: Arc<Mutex<HashMap<i64, WatchSlot>>> = Default::default();
    let mut next_id: i64 = 0;
    loop {
        let msg = tokio::select! {
            _ = stream_cancel.cancelled() => break,
            _ = tx.closed() => break,
            msg = inbound.next() => msg,
        };
        let Some(Ok(msg)) = msg else { break };
        match msg.request_union {
            Some(RequestUnion::CreateRequest(create)) => {
                let id = if create.watch_id > 0 {
                    create.watch_id
                } else {
                    next_id
                };
                let taken = watches
                    .lock()
                    .expect("watch map poisoned")
                    .contains_key(&id);
                if let Err(e) =
                    limits::check_key(&create.key).and(limits::check_range_end(&create.range_end))
                {
                    let _ = tx.send(Ok(rejected(&keeper, id, e.to_string()))).await;
                    continue;
                }
                if taken {
                    let reason = format!("etcdserver: duplicate watch ID {id}");
                    let _ = tx.send(Ok(rejected(&keeper, id, reason))).await;
                    continue;
                }
                next_id = next_id.max(id + 1);
                let slot = WatchSlot {
                    cancel: stream_cancel.child_token(),
                    synced: Default::default(),
                };
                let task = WatchTask {
                    keeper: keeper.clone(),
                    id,
                    create,
                    tx: tx.clone(),
                    cancel: slot.cancel.clone(),
                    synced: slot.synced.clone(),
                };
                watches.lock().expect("watch map poisoned").insert(id, slot);
                let watches = watches.clone();
                tokio::spawn(async move {
                    task.run().await;
                    watches.lock().expect("watch map poisoned").remove(&id);
                });
            }
            Some(RequestUnion::CancelRequest(cancel)) => {
                let slot = watches
                    .lock()
                    .expect("watch map poisoned")
                    .remove(&cancel.watch_id);
                if let Some(slot) = slot {
                    slot.cancel.cancel();
                    let resp = WatchResponse {
                        header: keeper.header(keeper.node.read(|s| s.revision())),
                        watch_id: cancel.watch_id,
                        canceled: true,
                        ..Default::default()
                    };
                    let _ = tx.send(Ok(resp)).await;
                }
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                // Every watch on the stream has seen everything up to the smallest synced
                // revision; report that, as etcd does.
                let current = keeper.node.read(|s| s.revision());
                let synced = watches
                    .lock()
                    .expect("watch map poisoned")
                    .values()
                    .map(|w| w.synced.load(std::sync::atomic::Ordering::Acquire))
                    .min()
                    .unwrap_or(current);
                let resp = WatchResponse {
                    header: keeper.header(synced),
                    watch_id: PROGRESS_WATCH_ID,
                    ..Default::default()
                };
                let _ = tx.send(Ok(resp)).await;
            }
            None => {}
        }
    }
    stream_cancel.cancel();
}

fn rejected(keeper: &Keeper, id: i64, reason: String) -> WatchResponse {
    WatchResponse {
        header: keeper.header(keeper.node.read(|s| s.revision())),
        watch_id: id,
        created: true,
        canceled: true,
        cancel_reason: reason,
        ..Default::default()
    }
}

struct WatchTask {
    keeper: Arc<Keeper>,
    id: i64,
    create: WatchCreateRequest,
    tx: mpsc::Sender<Result<WatchResponse, Status>>,
    cancel: CancellationToken,
    /// The revision up to which this watch has delivered every event.
    synced: Arc<std::sync::atomic::AtomicI64>,
}

impl WatchTask {
    async fn run(self) {
        let keeper = &self.keeper;
        // Catch up with everything committed before the watch was created, so that a watch made
        // after a write or a compaction returned (possibly through another node) sees it. Without
        // a leader the watch still starts, from this node's state, as etcd's do.
        let barrier =
            tokio::time::timeout(keeper.config.request_timeout(), keeper.node.read_barrier());
        tokio::select! {
            _ = self.cancel.cancelled() => return,
            done = barrier => if !matches!(done, Ok(Ok(()))) {
                tracing::debug!(watch = self.id, "watch starts without a read barrier");
            },
        }
        let mut applied = keeper.node.applied();
        let current = keeper.node.read(|s| s.revision());
        let mut next = if self.create.start_revision > 0 {
            self.create.start_revision
        } else {
            current + 1
        };
        self.synced
            .store(next - 1, std::sync::atomic::Ordering::Release);
        let created = WatchResponse {
            header: keeper.header(current),
            watch_id: self.id,
            created: true,
            ..Default::default()
        };
        if self.tx.send(Ok(created)).await.is_err() {
            return;
        }
        let no_put = self.create.filters.contains(&(FilterType::Noput as i32));
        let no_delete = self.create.filters.contains(&(FilterType::Nodelete as i32));
        let progress_every = Duration::from_secs(keeper.config.watch_progress_s.max(1));
        let mut progress =
            tokio::time::interval_at(tokio::time::Instant::now() + progress_every, progress_every);
        loop {
            let (events, revision) = keeper.node.read(|s| {
                (
                    s.events(
                        next,
                        &self.create.key,
                        &self.create.range_end,
                        EVENTS_PER_READ,
                    ),
                    s.revision(),
                )
            });
            match events {
                Err(StoreError::Compacted { compact_revision }) => {
                    let resp = WatchResponse {
                        header: keeper.header(revision),
                        watch_id: self.id,
                        canceled: true,
                        compact_revision,
                        cancel_reason: StoreError::Compacted { compact_revision }.to_string(),
                        ..Default::default()
                    };
                    let _ = self.tx.send(Ok(resp)).await;
                    return;
                }
                Err(e) => {
                    let resp = WatchResponse {
                        header: keeper.header(revision),
                        watch_id: self.id,
                        canceled: true,
                        cancel_reason: e.to_string(),
                        ..Default::default()
                    };
                    let _ = self.tx.send(Ok(resp)).await;
                    return;
                }
                Ok(events) if !events.is_empty() => {
                    let last = events.last().map(|e| e.kv.mod_revision).unwrap_or(next);
                    // A full read may stop before the current revision; otherwise every
                    // revision up to the one read with the events has been covered.
                    let covered = if events.len() >= EVENTS_PER_READ {
                        last
                    } else {
                        revision.max(last)
                    };
                    let events: Vec<_> = events
                        .iter()
                        .filter(|e| match e.kind {
                            EventKind::Put => !no_put,
                            EventKind::Delete => !no_delete,
                        })
                        .map(|e| event_to_pb(e, self.create.prev_kv))
                        .collect();
                    next = covered + 1;
                    if !events.is_empty() {
                        let resp = WatchResponse {
                            header: keeper.header(revision),
                            watch_id: self.id,
                            events,
                            ..Default::default()
                        };
                        tokio::select! {
                            _ = self.cancel.cancelled() => return,
                            sent = self.tx.send(Ok(resp)) => if sent.is_err() { return },
                        }
                        progress.reset();
                    }
                    self.synced
                        .store(covered, std::sync::atomic::Ordering::Release);
                }
                Ok(_) => {
                    next = next.max(revision + 1);
                    self.synced
                        .store(next - 1, std::sync::atomic::Ordering::Release);
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        changed = applied.changed() => if changed.is_err() { return },
                        _ = progress.tick(), if self.create.progress_notify => {
                            let resp = WatchResponse {
                                header: keeper.header(next - 1),
                                watch_id: self.id,
                                ..Default::default()
                            };
                            if self.tx.send(Ok(resp)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        }
    }
}
