//! keeper: Longlink's replicated configuration and coordination store, speaking the etcd v3 API.
//!
//! - `store`: the replicated state machine (revisioned key-value store with leases).
//! - `server`: the gRPC services on top of a raft-store node, and [`run`].

pub mod config;
pub mod error;
pub mod faults;
pub mod limits;
mod pb_impl;
mod server;
pub mod store;

pub use config::KeeperConfig;
pub use error::KeeperError;
pub use server::run;
pub use server::serve;
