//! Generated gRPC types: the etcd v3 API the keeper serves and the internal Raft peer service,
//! [`OneWrite`], the channel wrapper every client of these services uses, and [`ConnectionTasks`],
//! which runs the work hyper starts for a connection inside the connection's task.
//!
//! The modules are siblings at the crate root because prost refers to other
//! packages by relative path (`super::mvccpb::KeyValue`).

mod connection_tasks;
mod one_write;

pub use connection_tasks::ConnectionTasks;
pub use one_write::OneWrite;

/// etcd key-value types (`mvccpb`).
#[allow(clippy::all)]
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

/// etcd v3 services and their messages (`etcdserverpb`).
#[allow(clippy::all)]
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

/// Raft peer service between members of a group (`longlink.raft`); peers only.
#[allow(clippy::all)]
pub mod raftpb {
    tonic::include_proto!("longlink.raft");
}

/// register's service: session attach/detach/lookup, room sync and digests (`longlink.register`).
#[allow(clippy::all)]
pub mod registerpb {
    tonic::include_proto!("longlink.register");
}

/// room's internal service called by center: push, broadcast, kick, stats (`longlink.room`).
#[allow(clippy::all)]
pub mod roompb {
    tonic::include_proto!("longlink.room");
}

/// Frames between a device and a room (`longlink.client`); devices are never trusted.
#[allow(clippy::all)]
pub mod clientpb {
    tonic::include_proto!("longlink.client");
}

/// center's API for application servers, and the Coordinator service rooms report events to (`longlink.center`).
#[allow(clippy::all)]
pub mod centerpb {
    tonic::include_proto!("longlink.center");
}

#[cfg(test)]
mod tests {
    //! Byte-level checks that catch a wrong field number or type in the .proto files.

    use super::{etcdserverpb, mvccpb};
    use prost::Message;

    #[test]
    fn put_request_wire_format() {
        let req = etcdserverpb::PutRequest {
            key: b"a".to_vec(),
            value: b"b".to_vec(),
            lease: 5,
            prev_kv: true,
            ..Default::default()
        };
        // key=1 (len), value=2 (len), lease=3 (varint), prev_kv=4 (varint).
        assert_eq!(
            req.encode_to_vec(),
            [0x0a, 1, b'a', 0x12, 1, b'b', 0x18, 5, 0x20, 1]
        );
    }

    #[test]
    fn range_response_wire_format() {
        let resp = etcdserverpb::RangeResponse {
            header: Some(etcdserverpb::ResponseHeader {
                revision: 7,
                ..Default::default()
            }),
            kvs: vec![mvccpb::KeyValue {
                key: b"k".to_vec(),
                mod_revision: 3,
                lease: 9,
                ..Default::default()
            }],
            more: true,
            count: 2,
        };
        #[rustfmt::skip]
        let expected = [
            0x0a, 2, 0x18, 7,                         // header=1 { revision=3: 7 }
            0x12, 7, 0x0a, 1, b'k', 0x18, 3, 0x30, 9, // kvs=2 { key=1, mod_revision=3, lease=6 }
            0x18, 1,                                  // more=3
            0x20, 2,                                  // count=4
        ];
        assert_eq!(resp.encode_to_vec(), expected);
    }

    #[test]
    fn lease_and_compare_wire_format() {
        // etcd's upper-case names must keep their numbers: TTL=1, ID=2.
        let grant = etcdserverpb::LeaseGrantRequest { ttl: 10, id: 42 };
        assert_eq!(grant.encode_to_vec(), [0x08, 10, 0x10, 42]);

        // range_end is field 64: tag (64 << 3 | 2) = 0x202, varint [0x82, 0x04].
        let cmp = etcdserverpb::Compare {
            key: b"k".to_vec(),
            target_union: Some(etcdserverpb::compare::TargetUnion::ModRevision(4)),
            range_end: b"z".to_vec(),
            ..Default::default()
        };
        assert_eq!(
            cmp.encode_to_vec(),
            [0x1a, 1, b'k', 0x30, 4, 0x82, 0x04, 1, b'z']
        );
    }
}
