//! Types shared by register, room and center, so the three agree byte for byte.

pub mod apps;
pub mod digest;
pub mod slots;

pub use apps::App;
pub use apps::AppsConfig;
pub use digest::Digest;
pub use digest::session_hash;
pub use slots::SLOTS;
pub use slots::SlotMap;
pub use slots::slot_of;

/// HTTP/2 flow-control windows for register gRPC, on the register and on its clients alike:
/// Attach and Sync batches run to ~100 KiB, and HTTP/2's default 64 KiB windows would hold each
/// one up for a window update. Flow-control credit, not buffers.
pub const GRPC_STREAM_WINDOW: u32 = 1 << 20;
/// See [`GRPC_STREAM_WINDOW`]: room for a few batches in flight on one connection.
pub const GRPC_CONNECTION_WINDOW: u32 = 8 << 20;
