//! `mvccpb.KeyValue` <-> [`store::KeyValue`].

use longlink_proto::mvccpb;

use crate::store::KeyValue;

impl From<KeyValue> for mvccpb::KeyValue {
    fn from(kv: KeyValue) -> Self {
        mvccpb::KeyValue {
            key: kv.key,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            value: kv.value,
            lease: kv.lease,
        }
    }
}
