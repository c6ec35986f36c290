//! Size limits on client requests, checked before anything reaches the Raft log.
//!
//! Trust boundary: clients of the etcd API are not trusted to keep keys and values small; a few
//! huge entries would slow every replica's log, snapshot and watch.

use prost::Message;

use crate::error::KeeperError;

/// Largest key accepted.
pub const MAX_KEY: usize = 4 * 1024;
/// Largest value accepted.
pub const MAX_VALUE: usize = 1536 * 1024;
/// Largest encoded request accepted.
pub const MAX_REQUEST: usize = 2 * 1024 * 1024;
/// What the gRPC layer will decode at all; requests between [`MAX_REQUEST`] and this get our
/// own error naming the limit, larger ones the transport's.
pub const MAX_DECODE: usize = 16 * 1024 * 1024;

pub fn check_request(req: &impl Message) -> Result<(), KeeperError> {
    let len = req.encoded_len();
    if len > MAX_REQUEST {
        return Err(KeeperError::Limit(format!(
            "etcdserver: request is too large: {len} bytes, the limit is {MAX_REQUEST} bytes (2 MiB)"
        )));
    }
    Ok(())
}

pub fn check_key(key: &[u8]) -> Result<(), KeeperError> {
    if key.is_empty() {
        return Err(KeeperError::InvalidArgument(
            "etcdserver: key is not provided".into(),
        ));
    }
    check_range_end(key)
}

/// Like [`check_key`] but an empty key is fine (range ends, and range starts when a range end
/// is given).
pub fn check_range_end(key: &[u8]) -> Result<(), KeeperError> {
    if key.len() > MAX_KEY {
        return Err(KeeperError::Limit(format!(
            "etcdserver: key is too large: {} bytes, the limit is {MAX_KEY} bytes (4 KiB)",
            key.len()
        )));
    }
    Ok(())
}

pub fn check_value(value: &[u8]) -> Result<(), KeeperError> {
    if value.len() > MAX_VALUE {
        return Err(KeeperError::Limit(format!(
            "etcdserver: value is too large: {} bytes, the limit is {MAX_VALUE} bytes (1.5 MiB)",
            value.len()
        )));
    }
    Ok(())
}
