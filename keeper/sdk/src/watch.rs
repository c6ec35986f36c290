//! [`WatchEvents`]: a watch that survives disconnects. It remembers the last revision it
//! returned and, after any stream failure, reopens on the next endpoint from that revision + 1,
//! so no event is skipped or repeated. If the keeper no longer has that history, `next()` says
//! so with [`Error::Compacted`] instead of silently jumping ahead.

use std::sync::Arc;

use longlink_proto::etcdserverpb::WatchCreateRequest;
use longlink_proto::etcdserverpb::WatchRequest;
use longlink_proto::etcdserverpb::WatchResponse;
use longlink_proto::etcdserverpb::watch_client::WatchClient;
use longlink_proto::etcdserverpb::watch_request::RequestUnion;
use longlink_proto::mvccpb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::backoff::Backoff;
use crate::client::KeyValue;
use crate::conn::Conn;
use crate::error::Error;
use crate::error::Result;

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change. For a delete, `kv` holds the key and the deleting revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub kv: KeyValue,
    /// The revision of the write that made this change.
    pub revision: i64,
}

/// A resumable watch over a key or key range.
pub struct WatchEvents {
    conn: Arc<Conn>,
    key: Vec<u8>,
    range_end: Vec<u8>,
    /// Every event below this revision has been returned; the next stream starts here.
    /// 0 until the first stream tells us the current revision (a watch "from now").
    next_revision: i64,
    stream: Option<Active>,
    backoff: Backoff,
}

struct Active {
    /// Kept so the request side of the stream stays open.
    _requests: mpsc::Sender<WatchRequest>,
    responses: Streaming<WatchResponse>,
    generation: u64,
}

impl WatchEvents {
    pub(crate) fn new(conn: Arc<Conn>, key: Vec<u8>, range_end: Vec<u8>, start: i64) -> Self {
        Self {
            conn,
            key,
            range_end,
            next_revision: start.max(0),
            stream: None,
            backoff: Backoff::default(),
        }
    }

    /// The last revision whose events have all been returned.
    pub fn revision(&self) -> i64 {
        (self.next_revision - 1).max(0)
    }

    /// Opens the stream now (one attempt per endpoint), so a caller learns about an unreachable
    /// keeper at once rather than on the first `next()`.
    pub(crate) async fn open_now(&mut self) -> Result<()> {
        self.stream = Some(self.open().await?);
        Ok(())
    }

    async fn open(&mut self) -> Result<Active> {
        let (channel, generation) = self.conn.channel();
        let (tx, rx) = mpsc::channel(1);
        let create = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: self.key.clone(),
                range_end: self.range_end.clone(),
                start_revision: self.next_revision,
                progress_notify: true,
                ..Default::default()
            })),
        };
        // Cannot fail: the receiver is alive and the channel is empty.
        let _ = tx.try_send(create);
        let timeout = self.conn.request_timeout;
        let opened = tokio::time::timeout(timeout, async {
            let mut responses = WatchClient::new(channel)
                .watch(ReceiverStream::new(rx))
                .await?
                .into_inner();
            let first = responses.message().await?;
            Ok::<_, tonic::Status>((responses, first))
        })
        .await;
        let (responses, first) = match opened {
            Ok(Ok(v)) => v,
            Ok(Err(status)) => {
                self.conn.fail(generation);
                return Err(Error::Unavailable(format!("watch: {}", status.message())));
            }
            Err(_) => {
                self.conn.fail(generation);
                return Err(Error::Timeout {
                    what: "watch create".into(),
                    after: timeout,
                });
            }
        };
        let Some(first) = first else {
            self.conn.fail(generation);
            return Err(Error::Unavailable("watch stream closed at creation".into()));
        };
        if first.canceled {
            return Err(cancel_error(&first));
        }
        if self.next_revision == 0 {
            let current = first.header.map(|h| h.revision).unwrap_or_default();
            self.next_revision = current + 1;
        }
        Ok(Active {
            _requests: tx,
            responses,
            generation,
        })
    }

    /// The next batch of events (all of one or more revisions, in revision order). Waits as long
    /// as it takes, reconnecting with backoff; fails only with [`Error::Compacted`] (the caller
    /// must reload state and watch again) or a non-retryable rejection of the watch.
    ///
    /// Cancel-safe: dropping the future loses no events.
    pub async fn next(&mut self) -> Result<Vec<WatchEvent>> {
        loop {
            let Some(active) = self.stream.as_mut() else {
                match self.open().await {
                    Ok(active) => self.stream = Some(active),
                    Err(e @ (Error::Compacted { .. } | Error::Invalid(_))) => return Err(e),
                    Err(e) => {
                        if self.backoff.attempts() >= 3 {
                            tracing::warn!(error = %e, "watch reconnect failing; retrying");
                        }
                        self.backoff.wait().await;
                    }
                }
                continue;
            };
            let msg = active.responses.message().await;
            let generation = active.generation;
            match msg {
                Ok(Some(resp)) => {
                    if resp.canceled {
                        self.stream = None;
                        let e = cancel_error(&resp);
                        if matches!(e, Error::Compacted { .. } | Error::Invalid(_)) {
                            return Err(e);
                        }
                        tracing::debug!(error = %e, "watch cancelled by the keeper; reopening");
                        self.backoff.wait().await;
                        continue;
                    }
                    if resp.created {
                        continue;
                    }
                    if resp.events.is_empty() {
                        // A progress notification: everything up to its revision was sent.
                        if let Some(h) = resp.header {
                            self.next_revision = self.next_revision.max(h.revision + 1);
                        }
                        continue;
                    }
                    let events: Vec<WatchEvent> =
                        resp.events.into_iter().map(WatchEvent::from).collect();
                    let last = events.iter().map(|e| e.revision).max().unwrap_or_default();
                    self.next_revision = self.next_revision.max(last + 1);
                    self.backoff.reset();
                    return Ok(events);
                }
                Ok(None) | Err(_) => {
                    tracing::debug!(
                        from = self.next_revision,
                        "watch stream broke; resuming on the next endpoint"
                    );
                    self.stream = None;
                    self.conn.fail(generation);
                    self.backoff.wait().await;
                }
            }
        }
    }
}

fn cancel_error(resp: &WatchResponse) -> Error {
    if resp.compact_revision > 0 {
        Error::Compacted {
            compact_revision: resp.compact_revision,
        }
    } else if resp.cancel_reason.contains("limit") || resp.cancel_reason.contains("invalid") {
        Error::Invalid(resp.cancel_reason.clone())
    } else {
        Error::Unavailable(format!("watch cancelled: {}", resp.cancel_reason))
    }
}

impl From<mvccpb::Event> for WatchEvent {
    fn from(e: mvccpb::Event) -> Self {
        let kind = if e.r#type == mvccpb::event::EventType::Delete as i32 {
            EventKind::Delete
        } else {
            EventKind::Put
        };
        let kv: KeyValue = e.kv.unwrap_or_default().into();
        Self {
            kind,
            revision: kv.mod_revision,
            kv,
        }
    }
}
