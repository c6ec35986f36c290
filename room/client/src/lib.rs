//! Device-side client for the room protocol (being built).
