//! center: the senders' API (HTTP JSON + gRPC) of Longlink: push to users or to all, presence,
//! kick, the dispatcher (which rooms a device should use) and the coordinator (uplinks and
//! presence events to app webhooks). Stateless: every instance serves every app.
//!
//! - `service`: the operations, shared by `http` and `grpc`; `fabric`: calls to register/room.
//! - `webhook`: the coordinator; `dispatch`: rendezvous hashing; `ratelimit`: token buckets.
//! - `server`: [`run`], which wires the keeper (apps, discovery, slot map) to all of it.

pub mod api;
pub mod broadcast;
pub mod coalesce;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod fabric;
pub mod grpc;
pub mod http;
pub mod ids;
pub mod ratelimit;
pub mod rooms;
pub mod server;
pub mod service;
pub mod webhook;

pub use config::CenterConfig;
pub use config::CenterTuning;
pub use error::Error;
pub use error::Result;
pub use server::run;
pub use server::serve;
pub use service::Center;
pub use service::Inputs;
