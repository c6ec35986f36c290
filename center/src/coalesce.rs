//! Merging of concurrent calls to one destination into batched RPCs.
//!
//! A [`Lane`] serves one destination (a room's `Push`, a register's `LookupBatch`). Callers hand
//! it a job (their items); one task per lane sends at most `inflight` RPCs at once, and each RPC
//! carries every job that queued while the previous ones were in flight, up to `max_items` items
//! and `max_weight` bytes. A lightly loaded lane therefore sends one job per RPC with no added
//! wait, and a saturated one sends few large RPCs instead of many small ones: the per-RPC cost
//! (HTTP/2 frames, task wake-ups, a lock in the room) is paid once per batch, not once per request.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::sync::mpsc;
use tokio::sync::oneshot;

use crate::error::Error;
use crate::error::Result;

/// The size bounds of one lane.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// RPCs in flight at once.
    pub inflight: usize,
    /// Jobs allowed to wait for their turn; past this a call fails fast.
    pub queue: usize,
    /// Items per RPC (a single larger job is sent alone).
    pub max_items: usize,
    /// Summed job weights (bytes) per RPC (a single heavier job is sent alone).
    pub max_weight: usize,
}

struct Job<I, O> {
    items: Vec<I>,
    weight: usize,
    reply: oneshot::Sender<Result<Vec<O>>>,
}

/// One destination's queue of jobs; dropping every clone ends its task once the queue is empty.
pub struct Lane<I, O> {
    jobs: mpsc::Sender<Job<I, O>>,
    /// Names the destination and the limit in a refusal.
    name: Arc<str>,
    queue: usize,
}

impl<I, O> Clone for Lane<I, O> {
    fn clone(&self) -> Self {
        Lane {
            jobs: self.jobs.clone(),
            name: self.name.clone(),
            queue: self.queue,
        }
    }
}

impl<I: Send + 'static, O: Send + 'static> Lane<I, O> {
    /// Starts the lane's task. `send` performs one RPC with the merged items and answers one
    /// output per item, in order. `name` is the destination as errors should call it.
    pub fn spawn<F, Fut>(name: String, limits: Limits, send: F) -> Lane<I, O>
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<O>>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(limits.queue.max(1));
        let name: Arc<str> = name.into();
        tokio::spawn(run(rx, limits, Arc::new(send), name.clone()));
        Lane {
            jobs: tx,
            name,
            queue: limits.queue.max(1),
        }
    }

    /// Sends `items` (weighing `weight` bytes) in the next RPC with room for them and waits for
    /// their answers, one per item in order.
    pub async fn call(&self, items: Vec<I>, weight: usize) -> Result<Vec<O>> {
        if items.is_empty() {
            return Ok(vec![]);
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            items,
            weight,
            reply,
        };
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("center_lane_overload_total").increment(1);
                return Err(Error::Unavailable(format!(
                    "{} has {} calls waiting; retry later",
                    self.name, self.queue
                )));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(Error::Internal(format!("{} lane stopped", self.name)));
            }
        }
        answer.await.unwrap_or_else(|_| {
            Err(Error::Internal(format!(
                "{} lane dropped a call",
                self.name
            )))
        })
    }
}

async fn run<I, O, F, Fut>(
    mut rx: mpsc::Receiver<Job<I, O>>,
    limits: Limits,
    send: Arc<F>,
    name: Arc<str>,
) where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<O>>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(limits.inflight.max(1)));
    // A job that did not fit in the previous batch opens the next one.
    let mut carried: Option<Job<I, O>> = None;
    loop {
        // Waiting for a permit first lets jobs pile up while every RPC is in flight.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let first = match carried.take() {
            Some(job) => job,
            None => match rx.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let mut items = first.items.len();
        let mut weight = first.weight;
        let mut jobs = vec![first];
        while items < limits.max_items && weight < limits.max_weight {
            let Ok(job) = rx.try_recv() else { break };
            if items + job.items.len() > limits.max_items || weight + job.weight > limits.max_weight
            {
                carried = Some(job);
                break;
            }
            items += job.items.len();
            weight += job.weight;
            jobs.push(job);
        }
        metrics::histogram!("center_lane_batch_jobs").record(jobs.len() as f64);
        let send = send.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut sizes = Vec::with_capacity(jobs.len());
            let mut replies = Vec::with_capacity(jobs.len());
            let mut merged = Vec::with_capacity(items);
            for job in jobs {
                sizes.push(job.items.len());
                replies.push(job.reply);
                merged.extend(job.items);
            }
            match send(merged).await {
                Ok(answers) if answers.len() == items => {
                    let mut answers = answers.into_iter();
                    for (size, reply) in sizes.into_iter().zip(replies) {
                        let _ = reply.send(Ok(answers.by_ref().take(size).collect()));
                    }
                }
                Ok(answers) => {
                    let why = format!(
                        "{name} answered {} results for {items} items",
                        answers.len()
                    );
                    for reply in replies {
                        let _ = reply.send(Err(Error::Internal(why.clone())));
                    }
                }
                Err(e) => {
                    let why = e.to_string();
                    for reply in replies {
                        let _ = reply.send(Err(Error::Unavailable(why.clone())));
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn limits(inflight: usize, queue: usize) -> Limits {
        Limits {
            inflight,
            queue,
            max_items: 10,
            max_weight: 100,
        }
    }

    /// The items of every RPC a test lane sent, in order.
    type Sent = Arc<Mutex<Vec<Vec<u32>>>>;

    /// A lane whose RPCs double each item, record their sizes, and wait for `gate` permits.
    fn doubling(limits: Limits, gate: Arc<Semaphore>) -> (Lane<u32, u32>, Sent) {
        let sent = Arc::new(Mutex::new(vec![]));
        let log = sent.clone();
        let lane = Lane::spawn("test lane".into(), limits, move |items: Vec<u32>| {
            let gate = gate.clone();
            log.lock().unwrap().push(items.clone());
            async move {
                gate.acquire().await.unwrap().forget();
                Ok(items.into_iter().map(|i| i * 2).collect())
            }
        });
        (lane, sent)
    }

    async fn wait_for_rpcs(sent: &Mutex<Vec<Vec<u32>>>, n: usize) {
        for _ in 0..1_000 {
            if sent.lock().unwrap().len() >= n {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("{n} RPCs never started: {:?}", sent.lock().unwrap());
    }

    #[tokio::test]
    async fn jobs_queued_behind_a_busy_rpc_share_the_next_one() {
        let gate = Arc::new(Semaphore::new(0));
        let (lane, sent) = doubling(limits(1, 100), gate.clone());
        let first = tokio::spawn({
            let lane = lane.clone();
            async move { lane.call(vec![1], 1).await }
        });
        wait_for_rpcs(&sent, 1).await;
        let queued: Vec<_> = (0..3u32)
            .map(|i| {
                let lane = lane.clone();
                tokio::spawn(async move { lane.call(vec![10 * i, 10 * i + 1], 1).await })
            })
            .collect();
        // Let the three jobs reach the queue, then release the first RPC.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        gate.add_permits(10);
        assert_eq!(first.await.unwrap().unwrap(), vec![2]);
        for (i, call) in queued.into_iter().enumerate() {
            let i = i as u32;
            assert_eq!(call.await.unwrap().unwrap(), vec![20 * i, 20 * i + 2]);
        }
        assert_eq!(
            *sent.lock().unwrap(),
            vec![vec![1], vec![0, 1, 10, 11, 20, 21]]
        );
    }

    #[tokio::test]
    async fn batches_respect_the_item_and_weight_bounds() {
        let gate = Arc::new(Semaphore::new(0));
        let (lane, sent) = doubling(limits(1, 100), gate.clone());
        let blocker = tokio::spawn({
            let lane = lane.clone();
            async move { lane.call(vec![0], 1).await }
        });
        wait_for_rpcs(&sent, 1).await;
        // 4 + 4 items fit (max 10); the third job of 4 opens the next batch. The heavy job is
        // alone: its weight alone reaches the bound.
        let jobs = [
            (vec![1; 4], 10),
            (vec![2; 4], 10),
            (vec![3; 4], 10),
            (vec![4], 100),
        ];
        let mut calls = vec![];
        for (items, weight) in jobs {
            let lane = lane.clone();
            calls.push(tokio::spawn(async move { lane.call(items, weight).await }));
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
        }
        gate.add_permits(10);
        blocker.await.unwrap().unwrap();
        for call in calls {
            call.await.unwrap().unwrap();
        }
        let sizes: Vec<usize> = sent.lock().unwrap().iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![1, 8, 4, 1]);
    }

    #[tokio::test]
    async fn a_full_queue_fails_fast_and_names_the_destination() {
        let gate = Arc::new(Semaphore::new(0));
        let (lane, sent) = doubling(limits(1, 1), gate.clone());
        let busy = tokio::spawn({
            let lane = lane.clone();
            async move { lane.call(vec![1], 1).await }
        });
        wait_for_rpcs(&sent, 1).await;
        let waiting = tokio::spawn({
            let lane = lane.clone();
            async move { lane.call(vec![2], 1).await }
        });
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        let err = lane.call(vec![3], 1).await.unwrap_err();
        assert!(
            err.to_string().contains("test lane has 1 calls waiting"),
            "{err}"
        );
        gate.add_permits(10);
        assert_eq!(busy.await.unwrap().unwrap(), vec![2]);
        assert_eq!(waiting.await.unwrap().unwrap(), vec![4]);
    }

    #[tokio::test]
    async fn a_failed_or_short_answer_fails_every_merged_job() {
        let lane: Lane<u32, u32> = Lane::spawn(
            "short".into(),
            limits(2, 10),
            |items: Vec<u32>| async move {
                if items.contains(&0) {
                    Err(Error::Unavailable("room is down".into()))
                } else {
                    Ok(vec![1])
                }
            },
        );
        let err = lane.call(vec![0], 1).await.unwrap_err();
        assert!(
            matches!(err, Error::Unavailable(ref m) if m == "room is down"),
            "{err}"
        );
        let err = lane.call(vec![5, 6], 1).await.unwrap_err();
        assert!(
            err.to_string().contains("answered 1 results for 2 items"),
            "{err}"
        );
        assert_eq!(lane.call(vec![7], 1).await.unwrap(), vec![1]);
    }
}
