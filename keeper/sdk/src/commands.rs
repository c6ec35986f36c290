//! Control commands: [`CommandStream`] yields every command under
//! `/commands/{service}/{id}/` that has no ack under `/command-acks/{service}/{id}/`, in seq
//! order, then new ones as they are written. [`Command::ack`] writes the ack, so a command is
//! delivered again (to a new stream, after a restart) until it is acknowledged.

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use crate::client::Keeper;
use crate::error::Error;
use crate::error::Result;
use crate::layout;
use crate::layout::CommandAck;
use crate::layout::CommandDoc;
use crate::watch::EventKind;
use crate::watch::WatchEvents;

/// One command to act on; acknowledge it with [`Command::ack`].
#[derive(Debug)]
pub struct Command {
    pub seq: u64,
    pub verb: String,
    pub args: serde_json::Value,
    /// RFC 3339, as written by the issuer.
    pub issued_at: String,
    keeper: Keeper,
    ack_key: String,
}

impl Command {
    /// Records the outcome; the command will not be delivered again.
    pub async fn ack(self, ok: bool, message: impl Into<String>) -> Result<()> {
        let ack = CommandAck {
            ok,
            message: message.into(),
            at: layout::now_rfc3339(),
        };
        let body = serde_json::to_vec(&ack).map_err(|e| Error::Invalid(e.to_string()))?;
        self.keeper.put(&self.ack_key, body).await.map(|_| ())
    }
}

/// Unacknowledged commands for one instance, in seq order.
pub struct CommandStream {
    keeper: Keeper,
    service: String,
    id: String,
    /// Loaded or watched but not yet handed out, by seq.
    pending: BTreeMap<u64, CommandDoc>,
    /// Every seq at or below this has been handed out by this stream (or was acked when
    /// loaded); later events for them are ignored.
    delivered_up_to: u64,
    watch: WatchEvents,
}

impl Keeper {
    /// The command stream of instance `id` of `service`.
    pub async fn commands(&self, service: &str, id: &str) -> Result<CommandStream> {
        layout::check_name("service", service).map_err(Error::Invalid)?;
        layout::check_name("instance id", id).map_err(Error::Invalid)?;
        let mut stream = CommandStream {
            keeper: self.clone(),
            service: service.to_string(),
            id: id.to_string(),
            pending: BTreeMap::new(),
            delivered_up_to: 0,
            watch: self.watch_prefix_lazy(&layout::commands_prefix(service, id), 0),
        };
        stream.load().await?;
        Ok(stream)
    }
}

impl CommandStream {
    /// Reads every command and ack, keeps the unacknowledged ones, and watches from there.
    async fn load(&mut self) -> Result<()> {
        let (cmds, revision) = self
            .keeper
            .get_prefix(&layout::commands_prefix(&self.service, &self.id))
            .await?;
        let (acks, _) = self
            .keeper
            .get_prefix(&layout::command_acks_prefix(&self.service, &self.id))
            .await?;
        let acked: BTreeSet<u64> = acks
            .iter()
            .filter_map(|kv| layout::parse_seq_suffix(&kv.key))
            .collect();
        for kv in cmds {
            let Some(seq) = layout::parse_seq_suffix(&kv.key) else {
                continue;
            };
            if acked.contains(&seq) || seq <= self.delivered_up_to {
                continue;
            }
            match kv.json::<CommandDoc>() {
                Ok(doc) => {
                    self.pending.insert(seq, doc);
                }
                Err(e) => tracing::warn!(error = %e, "skipping an unreadable command"),
            }
        }
        self.watch = self.keeper.watch_prefix_lazy(
            &layout::commands_prefix(&self.service, &self.id),
            revision + 1,
        );
        Ok(())
    }

    /// The next unacknowledged command, waiting for one if there is none.
    pub async fn next(&mut self) -> Result<Command> {
        loop {
            if let Some((seq, doc)) = self.pending.pop_first() {
                self.delivered_up_to = self.delivered_up_to.max(seq);
                return Ok(Command {
                    seq,
                    verb: doc.verb,
                    args: doc.args,
                    issued_at: doc.issued_at,
                    keeper: self.keeper.clone(),
                    ack_key: layout::command_ack_key(&self.service, &self.id, seq),
                });
            }
            match self.watch.next().await {
                Ok(events) => {
                    for e in events {
                        if e.kind != EventKind::Put {
                            continue;
                        }
                        let Some(seq) = layout::parse_seq_suffix(&e.kv.key) else {
                            continue;
                        };
                        if seq <= self.delivered_up_to {
                            continue;
                        }
                        match e.kv.json::<CommandDoc>() {
                            Ok(doc) => {
                                self.pending.insert(seq, doc);
                            }
                            Err(err) => {
                                tracing::warn!(error = %err, "skipping an unreadable command")
                            }
                        }
                    }
                }
                Err(Error::Compacted { compact_revision }) => {
                    tracing::warn!(
                        compact_revision,
                        "command watch history compacted; reloading"
                    );
                    self.load().await?;
                }
                Err(e) => return Err(e),
            }
        }
    }
}
