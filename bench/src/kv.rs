//! The put and get requests of the closed-loop phases, and the keys they use.

use anyhow::Context;
use longlink_proto::etcdserverpb::PutRequest;
use longlink_proto::etcdserverpb::RangeRequest;

use crate::cluster::Cluster;
use crate::cluster::Kv;

/// One request of a closed-loop phase; each client issues them back to back.
pub enum Op {
    /// Puts a new key `bench/put/{client}/{seq}`: clients are numbered from `first_client` so
    /// that no two phases write the same key.
    Put { first_client: usize, value: Vec<u8> },
    /// Gets one of the `keys` keys written by [`prewrite`], chosen at random.
    Get { keys: usize, serializable: bool },
}

impl Op {
    pub async fn execute(
        &self,
        kv: &mut Kv,
        client: usize,
        seq: u64,
        rng: &mut Rng,
    ) -> anyhow::Result<()> {
        match self {
            Op::Put {
                first_client,
                value,
            } => {
                let key = format!("bench/put/{}/{seq}", first_client + client);
                kv.put(PutRequest {
                    key: key.into_bytes(),
                    value: value.clone(),
                    ..Default::default()
                })
                .await?;
            }
            Op::Get { keys, serializable } => {
                let key = get_key(rng.below(*keys));
                let response = kv
                    .range(RangeRequest {
                        key: key.clone().into_bytes(),
                        serializable: *serializable,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                anyhow::ensure!(
                    response.kvs.len() == 1,
                    "get {key} returned {} keys",
                    response.kvs.len()
                );
            }
        }
        Ok(())
    }
}

/// A value of `size` bytes; its content does not matter (neither system compresses values).
pub fn value(size: usize) -> Vec<u8> {
    (0..size).map(|i| b'a' + (i % 26) as u8).collect()
}

fn get_key(index: usize) -> String {
    format!("bench/get/{index:06}")
}

/// Writes the keys the get phases read, 16 at a time.
pub async fn prewrite(cluster: &Cluster, keys: usize, value: &[u8]) -> anyhow::Result<()> {
    const WRITERS: usize = 16;
    eprintln!("get: writing {keys} keys");
    let clients = cluster.connect(WRITERS).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for (writer, client) in clients.into_iter().enumerate() {
        let mut kv = client.kv_client();
        let value = value.to_vec();
        tasks.spawn(async move {
            for index in (writer..keys).step_by(WRITERS) {
                let key = get_key(index);
                kv.put(key.as_str(), value.clone(), None)
                    .await
                    .with_context(|| format!("put {key}"))?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// xorshift64*: enough to pick keys uniformly, no dependency, one per client task.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Zero is xorshift's fixed point; mix the seed so that nearby seeds diverge at once.
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn below(&mut self, bound: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (((x >> 32) * bound as u64) >> 32) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_covers_the_range() {
        let mut rng = Rng::new(7);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            seen[rng.below(10)] += 1;
        }
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
    }

    #[test]
    fn values_have_the_requested_size() {
        assert_eq!(value(256).len(), 256);
    }
}
