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
