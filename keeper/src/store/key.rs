//! Keys of the revisioned key space: the bytes, plus their first 16 bytes held inline so that
//! most comparisons while walking the key map stay inside the map's node.
//!
//! The key map is a B-tree whose nodes hold their keys by value. With `Vec<u8>` keys every
//! comparison of a lookup followed a pointer to the key's bytes on the heap, a cache miss per
//! step: a put's walks were 6% of a follower's CPU at 64 clients (docs/benchmarks.md, session
//! 12). Keys that differ in their first 16 bytes now compare as two integers.

use std::borrow::Borrow;
use std::cmp::Ordering;

use serde::Deserialize;
use serde::Deserializer;
use serde::Serialize;
use serde::Serializer;

/// A key. Orders exactly as its bytes do, so the map can also be searched by `&[u8]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Key {
    /// The first 16 bytes, zero-padded, as a big-endian integer. Unequal heads order as the
    /// bytes do: at the first differing position either both keys have a byte there, or the
    /// shorter key ended and the longer has a non-zero byte (else the padded heads would be
    /// equal there), so the shorter is a prefix of the longer and sorts first either way.
    head: u128,
    bytes: Vec<u8>,
}

impl Key {
    pub(crate) fn new(bytes: Vec<u8>) -> Self {
        let mut head = [0u8; 16];
        let n = bytes.len().min(16);
        head[..n].copy_from_slice(&bytes[..n]);
        Key {
            head: u128::from_be_bytes(head),
            bytes,
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> Ordering {
        // Equal heads: the keys agree on their first 16 bytes (or are zero-padded alike), and
        // only the bytes can tell them apart.
        self.head
            .cmp(&other.head)
            .then_with(|| self.bytes.cmp(&other.bytes))
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        &self.bytes
    }
}

/// Encoded exactly as the `Vec<u8>` it replaced, so snapshots keep their format.
impl Serialize for Key {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.bytes.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Vec::<u8>::deserialize(deserializer).map(Key::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys around the 16-byte boundary, with zero bytes where padding would be, and long shared
    /// prefixes.
    fn samples() -> Vec<Vec<u8>> {
        let mut keys: Vec<Vec<u8>> = vec![
            vec![],
            vec![0],
            vec![0, 0],
            b"a".to_vec(),
            b"a\0".to_vec(),
            b"a\0\x01".to_vec(),
            b"a\x01".to_vec(),
            b"b".to_vec(),
            vec![0xff; 3],
            vec![0xff; 20],
        ];
        for len in [15, 16, 17, 24] {
            let base: Vec<u8> = b"bench/put/12/3456789012345"
                .iter()
                .copied()
                .take(len)
                .collect();
            keys.push(base.clone());
            let mut zero = base.clone();
            zero.push(0);
            keys.push(zero);
            let mut high = base;
            high.push(0xff);
            keys.push(high);
        }
        keys
    }

    #[test]
    fn keys_order_as_their_bytes() {
        let keys = samples();
        for a in &keys {
            for b in &keys {
                let (ka, kb) = (Key::new(a.clone()), Key::new(b.clone()));
                assert_eq!(ka.cmp(&kb), a.cmp(b), "{a:?} vs {b:?}");
                assert_eq!(ka == kb, a == b, "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn keys_encode_as_byte_vectors() {
        let config = bincode::config::standard();
        for bytes in samples() {
            let as_key = bincode::serde::encode_to_vec(Key::new(bytes.clone()), config).unwrap();
            let as_vec = bincode::serde::encode_to_vec(&bytes, config).unwrap();
            assert_eq!(as_key, as_vec);
            let (back, _): (Key, usize) =
                bincode::serde::decode_from_slice(&as_vec, config).unwrap();
            assert_eq!(back, Key::new(bytes));
        }
    }
}
