//! `mvccpb.Event` <- [`store::Event`].

use longlink_proto::mvccpb;
use longlink_proto::mvccpb::event::EventType;

use crate::store::Event;
use crate::store::EventKind;

/// Converts an event; `prev_kv` is dropped unless the watch asked for it.
pub fn event_to_pb(event: &Event, with_prev_kv: bool) -> mvccpb::Event {
    mvccpb::Event {
        r#type: match event.kind {
            EventKind::Put => EventType::Put as i32,
            EventKind::Delete => EventType::Delete as i32,
        },
        kv: Some(event.kv.clone().into()),
        prev_kv: if with_prev_kv {
            event.prev_kv.clone().map(Into::into)
        } else {
            None
        },
    }
}
