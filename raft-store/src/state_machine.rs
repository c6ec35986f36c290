//! The contract between raft-store and the application state machine it replicates.
//!
//! raft-store owns everything openraft: the log, the vote, snapshots and the network. An
//! application (the keeper's revisioned KV, later the saver's inbox) only implements
//! [`StateMachine`]: a deterministic `apply` plus a way to dump and restore its whole state.

use std::fmt::Debug;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A deterministic state machine replicated through the Raft log.
///
/// The state lives in memory; raft-store makes it durable by keeping the log (and periodic
/// snapshots of [`StateMachine::snapshot`]) in RocksDB and replaying the log on restart.
pub trait StateMachine: Send + Sync + 'static {
    /// A command proposed by a client and recorded in the log.
    type Command: Serialize + DeserializeOwned + Debug + Send + Sync + 'static;
    /// What applying a command returns to the proposer.
    type Response: Serialize + DeserializeOwned + Debug + Send + Sync + 'static;

    /// Applies one committed command. `index` is the log index of the entry.
    ///
    /// Must be deterministic: every replica applies the same commands in the same order and must
    /// reach the same state. Wall-clock time, randomness and local configuration are not allowed
    /// here; anything like that travels inside the command.
    fn apply(&mut self, index: u64, command: Self::Command) -> Self::Response;

    /// A frozen copy of the whole state, taken for a snapshot.
    type Frozen: Send + 'static;

    /// Copies the state for a snapshot. Applies wait while this runs, so it must be cheap (O(1)
    /// with persistent data structures); the expensive part happens in
    /// [`StateMachine::write_frozen`] after applies have resumed.
    fn freeze(&self) -> Self::Frozen;

    /// Serializes a frozen copy into `out`, the snapshot file behind a buffer. Runs on a thread
    /// of its own while applies go on. Errors are the file's (a full disk, say).
    fn write_frozen(frozen: Self::Frozen, out: &mut dyn std::io::Write) -> std::io::Result<()>;

    /// Serializes the whole state now (what a snapshot of it contains).
    fn snapshot(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        Self::write_frozen(self.freeze(), &mut bytes).expect("writing to memory cannot fail");
        bytes
    }

    /// Replaces the whole state with a snapshot produced by [`StateMachine::snapshot`].
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String>;
}
