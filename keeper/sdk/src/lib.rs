//! keeper SDK: typed config, service discovery, elections and control commands over the
//! keeper's etcd v3 API. No openraft or RocksDB: it is only a gRPC client.
//!
//! Start with [`Keeper::connect`]; see `docs/sdk.md` and `examples/hello_service.rs`.

mod backoff;
mod client;
mod commands;
mod config;
mod conn;
mod discovery;
mod election;
mod error;
pub mod layout;
mod lease;
mod watch;

pub use backoff::Backoff;
pub use client::ConnectOptions;
pub use client::Keeper;
pub use client::KeyValue;
pub use client::RawClients;
pub use commands::Command;
pub use commands::CommandStream;
pub use config::ConfigHandle;
pub use config::parse_document;
pub use conn::Channel;
pub use discovery::Discovery;
pub use discovery::Instance;
pub use discovery::Registration;
pub use election::Leadership;
pub use error::Error;
pub use error::Result;
pub use layout::InstanceInfo;
/// The generated etcd v3 types the SDK speaks, for raw calls through [`Keeper::clients`].
pub use longlink_proto as proto;
pub use watch::EventKind;
pub use watch::WatchEvent;
pub use watch::WatchEvents;
