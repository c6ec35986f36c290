//! Runs the tasks hyper starts for one HTTP/2 connection inside the connection's own task.
//!
//! hyper hands work to an executor: on a server, every request stream (the service call, then the
//! response body); on a client, the connection's I/O and every request body. With tokio's
//! executor each of them is a task: allocated and registered, scheduled, and woken on every
//! event, and each frame a request's task queues for the connection wakes the connection's task
//! to write it. [`ConnectionTasks`] keeps them as futures that the connection's task polls next
//! to the connection: the replies that complete together wake one task, and the connection writes
//! what the futures it just polled queued in the same turn. With every client of a keeper on its
//! leader (64 clients) that took 11% less of the keeper's CPU per put (docs/decisions.md, "A
//! connection's request handlers run in the connection's task").
//!
//! The futures of one connection share its thread: they still run concurrently (one waiting does
//! not hold up the others), but not in parallel.
//!
//! ```ignore
//! let tasks = ConnectionTasks::default();
//! let connection = hyper::server::conn::http2::Builder::new(tasks.clone())
//!     .serve_connection(io, service);
//! tokio::spawn(tasks.drive(connection));
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::task::Poll;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use futures::task::AtomicWaker;

/// Rounds of (connection, started futures) one poll runs before it yields to the worker's other
/// tasks.
const MAX_TURNS: usize = 16;

type Started = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A hyper executor whose futures run inside [`ConnectionTasks::drive`]. Give one to each
/// connection's builder; clones share the connection's queue.
#[derive(Clone, Default)]
pub struct ConnectionTasks {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// Futures hyper started since the connection's task last took them.
    queue: Mutex<Vec<Started>>,
    /// The connection's task, woken when a future is started outside its poll.
    task: AtomicWaker,
    /// Set while `drive` polls: hyper starts futures from inside that poll (while it polls the
    /// connection), and `drive` takes them before it returns, so those need no wake-up.
    polling: AtomicBool,
}

impl Shared {
    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<Started>> {
        self.queue.lock().expect("connection task queue lock")
    }
}

impl<F> hyper::rt::Executor<F> for ConnectionTasks
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        self.shared.queue().push(Box::pin(future));
        if !self.shared.polling.load(Ordering::SeqCst) {
            self.shared.task.wake();
        }
    }
}

impl ConnectionTasks {
    /// Polls `connection` and the futures it starts until the connection has ended and every
    /// future has finished (as spawned tasks would have).
    pub async fn drive<C: Future>(self, connection: C) -> C::Output {
        let mut connection = std::pin::pin!(connection);
        let mut ended = None;
        let mut started = FuturesUnordered::new();
        std::future::poll_fn(|cx| {
            self.shared.task.register(cx.waker());
            self.shared.polling.store(true, Ordering::SeqCst);
            let mut outcome = Poll::Pending;
            for turn in 1..=MAX_TURNS {
                if ended.is_none()
                    && let Poll::Ready(output) = connection.as_mut().poll(cx)
                {
                    ended = Some(output);
                }
                let new = std::mem::take(&mut *self.shared.queue());
                let mut progress = !new.is_empty();
                started.extend(new);
                while let Poll::Ready(Some(())) = started.poll_next_unpin(cx) {
                    progress = true;
                }
                if ended.is_some() {
                    if started.is_empty() {
                        outcome = Poll::Ready(ended.take().expect("the connection ended"));
                    }
                    break;
                }
                // A future that finished (a request answered) queued frames: the connection
                // writes them now rather than on its next wake-up.
                if !progress {
                    break;
                }
                if turn == MAX_TURNS {
                    // Still busy: let the worker run its other tasks first.
                    cx.waker().wake_by_ref();
                }
            }
            self.shared.polling.store(false, Ordering::SeqCst);
            // Started during this poll after its last look (by a future it polled): not woken for.
            if outcome.is_pending() && !self.shared.queue().is_empty() {
                cx.waker().wake_by_ref();
            }
            outcome
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use hyper::rt::Executor;
    use tokio::sync::oneshot;

    use super::*;

    #[tokio::test]
    async fn drive_ends_when_the_connection_and_everything_it_started_have() {
        let tasks = ConnectionTasks::default();
        let (release, released) = oneshot::channel::<()>();
        let finished = Arc::new(AtomicBool::new(false));
        let connection = {
            let (tasks, finished) = (tasks.clone(), finished.clone());
            async move {
                tasks.execute(async move {
                    released.await.unwrap();
                    finished.store(true, Ordering::SeqCst);
                });
                "connection closed"
            }
        };
        let mut drive = std::pin::pin!(tasks.drive(connection));
        // The connection has ended; what it started still waits.
        assert!(futures::poll!(drive.as_mut()).is_pending());
        assert!(!finished.load(Ordering::SeqCst));
        release.send(()).unwrap();
        assert_eq!(drive.await, "connection closed");
        assert!(finished.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn started_futures_run_concurrently() {
        let tasks = ConnectionTasks::default();
        let (first_tx, first_rx) = oneshot::channel::<()>();
        let (second_tx, second_rx) = oneshot::channel::<()>();
        let connection = {
            let tasks = tasks.clone();
            async move {
                // Each waits for the other: polled one at a time to completion, neither ends.
                tasks.execute(async move {
                    first_tx.send(()).unwrap();
                    second_rx.await.unwrap();
                });
                tasks.execute(async move {
                    first_rx.await.unwrap();
                    second_tx.send(()).unwrap();
                });
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), tasks.drive(connection))
            .await
            .expect("both futures finish");
    }

    #[tokio::test]
    async fn a_future_started_outside_the_poll_still_runs() {
        let tasks = ConnectionTasks::default();
        let (close, closed) = oneshot::channel::<()>();
        let driver = tokio::spawn(tasks.clone().drive(async { closed.await.unwrap() }));
        let (ran, has_run) = oneshot::channel::<()>();
        tasks.execute(async move { ran.send(()).unwrap() });
        tokio::time::timeout(std::time::Duration::from_secs(10), has_run)
            .await
            .expect("the future runs")
            .unwrap();
        close.send(()).unwrap();
        driver.await.unwrap();
    }
}
