//! Conversions between the etcd wire types and the store's domain types, one file per type.
//! Nothing else converts; handlers call these.

mod compare;
mod event;

pub(crate) use event::event_to_pb;
mod key_value;
mod request_op;
mod response_op;
