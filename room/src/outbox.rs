//! The bounded outbound queue of one connection. Frames are shared `Bytes` (a broadcast frame is
//! encoded once and referenced by every queue). Drop policy: a push that would exceed either cap
//! (messages or bytes, from the live config) is refused, the connection is marked a slow consumer
//! and closed; its memory never grows past the caps. An empty queue holds no allocation.

use std::collections::VecDeque;
use std::future::Future;
use std::future::poll_fn;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::task::Context;
use std::task::Poll;

use bytes::Bytes;
use futures::task::AtomicWaker;

/// Why the connection is being closed by the room.
#[derive(Debug, Clone, PartialEq)]
pub enum Closing {
    /// The queue overflowed; close without a last frame (the socket is not draining anyway).
    SlowConsumer,
    /// Send this frame (kick or error) and close; frames still queued are not sent.
    Final(Bytes),
}

/// What the writer should do next.
#[derive(Debug, PartialEq)]
pub enum Next {
    Frame(Bytes),
    Empty,
    Close(Closing),
}

/// A refused push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// Over a cap: the connection is now closing as a slow consumer.
    Full,
    /// The connection is already closing.
    Closed,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Bytes>,
    /// Sum of the lengths of `queue`.
    bytes: usize,
    /// Set once; after it nothing is queued.
    closing: Option<Closing>,
}

#[derive(Default)]
pub struct Outbox {
    state: Mutex<State>,
    /// Set by a push or a close, taken by the writer's wait: a signal sent while the writer is
    /// busy is not lost.
    signal: AtomicBool,
    /// The connection's task, woken on a signal. Only that one task ever waits here, so one
    /// waker slot replaces a waiter list (and the wait future holds no list node).
    waker: AtomicWaker,
}

impl Outbox {
    /// Queues `frame` unless that would exceed `max_messages` or `max_bytes`.
    pub fn push(
        &self,
        frame: Bytes,
        max_messages: usize,
        max_bytes: usize,
    ) -> Result<(), PushError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.closing.is_some() {
            return Err(PushError::Closed);
        }
        if s.queue.len() >= max_messages || s.bytes + frame.len() > max_bytes {
            s.closing = Some(Closing::SlowConsumer);
            drop(s);
            self.signal();
            return Err(PushError::Full);
        }
        s.bytes += frame.len();
        s.queue.push_back(frame);
        drop(s);
        self.signal();
        Ok(())
    }

    /// Starts closing; the first close wins. Returns false if it was already closing.
    pub fn close(&self, closing: Closing) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.closing.is_some() {
            return false;
        }
        s.closing = Some(closing);
        drop(s);
        self.signal();
        true
    }

    pub fn is_closing(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closing
            .is_some()
    }

    /// The next thing to write. A close takes precedence over queued frames.
    pub fn pop(&self) -> Next {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = &s.closing {
            return Next::Close(c.clone());
        }
        match s.queue.pop_front() {
            Some(f) => {
                s.bytes -= f.len();
                if s.queue.is_empty() && s.queue.capacity() > 0 {
                    // Idle connections keep no queue allocation.
                    s.queue = VecDeque::new();
                }
                Next::Frame(f)
            }
            None => Next::Empty,
        }
    }

    /// (frames, bytes) queued.
    pub fn len(&self) -> (usize, usize) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (s.queue.len(), s.bytes)
    }

    fn signal(&self) {
        self.signal.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn poll_wait(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // A signal between the check and the registration would otherwise be missed.
        if self.signal.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// Waits for a push or a close (returns at once if one happened since the last wait).
    /// Only the connection's own task may wait.
    pub fn wait(&self) -> impl Future<Output = ()> + '_ {
        poll_fn(|cx| self.poll_wait(cx))
    }

    /// Waits until the outbox is closing.
    pub async fn closing(&self) {
        while !self.is_closing() {
            self.wait().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_mark_a_slow_consumer() {
        let o = Outbox::default();
        o.push(Bytes::from_static(b"12345"), 2, 100).unwrap();
        o.push(Bytes::from_static(b"12345"), 2, 100).unwrap();
        assert_eq!(o.len(), (2, 10));
        assert_eq!(
            o.push(Bytes::from_static(b"x"), 2, 100),
            Err(PushError::Full)
        );
        assert_eq!(o.pop(), Next::Close(Closing::SlowConsumer));
        assert_eq!(
            o.push(Bytes::from_static(b"x"), 2, 100),
            Err(PushError::Closed)
        );

        let o = Outbox::default();
        o.push(Bytes::from_static(b"12345"), 10, 8).unwrap();
        assert_eq!(
            o.push(Bytes::from_static(b"1234"), 10, 8),
            Err(PushError::Full)
        );
    }

    #[test]
    fn pop_in_order_then_empty_frees_the_queue() {
        let o = Outbox::default();
        o.push(Bytes::from_static(b"a"), 10, 100).unwrap();
        o.push(Bytes::from_static(b"b"), 10, 100).unwrap();
        assert_eq!(o.pop(), Next::Frame(Bytes::from_static(b"a")));
        assert_eq!(o.pop(), Next::Frame(Bytes::from_static(b"b")));
        assert_eq!(o.pop(), Next::Empty);
        assert_eq!(o.state.lock().unwrap().queue.capacity(), 0);
        assert!(o.close(Closing::Final(Bytes::from_static(b"k"))));
        assert!(!o.close(Closing::SlowConsumer));
        assert_eq!(
            o.pop(),
            Next::Close(Closing::Final(Bytes::from_static(b"k")))
        );
    }

    #[tokio::test]
    async fn wait_returns_after_a_push_made_while_not_waiting() {
        let o = Outbox::default();
        o.push(Bytes::from_static(b"a"), 10, 100).unwrap();
        // The stored permit makes this return at once.
        tokio::time::timeout(std::time::Duration::from_secs(1), o.wait())
            .await
            .unwrap();
    }
}
