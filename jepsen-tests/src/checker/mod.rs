//! Checkers: each takes a recorded history (and what was read back at the end) and says whether
//! a property of DESIGN.md §7 held, naming the smallest part of the history that breaks it.

pub mod durability;
pub mod linearizable;
pub mod push;
pub mod register;
pub mod sessions;
pub mod watch;
