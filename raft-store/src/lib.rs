//! raft-store: openraft on RocksDB, generic over the application state machine.
//!
//! Everything openraft-specific (type configuration, log and snapshot storage, the peer network)
//! lives in this crate. Applications implement [`StateMachine`], open a [`RaftNode`], mount its
//! [`RaftNode::peer_service`] on their gRPC server and use `write`, `read_barrier` and `read`.
//! An openraft upgrade touches this crate only.

mod db;
mod error;
mod forward;
mod journal;
mod link;
mod local_writes;
mod log_store;
mod network;
mod node;
mod service;
mod sm_store;
mod state_machine;
mod types;

pub use error::Error;
pub use error::Result;
pub use link::is_link;
pub use node::NodeConfig;
pub use node::NodeStatus;
pub use node::RaftNode;
pub use service::PeerService;
pub use state_machine::StateMachine;
pub use types::NodeId;

#[cfg(test)]
mod conformance;
