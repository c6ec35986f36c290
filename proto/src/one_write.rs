//! Client requests whose last DATA frame carries END_STREAM, so that a unary call goes out in one
//! write instead of two.
//!
//! hyper sends a request body frame by frame and marks a DATA frame END_STREAM only if the body
//! says it has ended by the time the frame is taken. tonic's encoded request body learns that it
//! has ended only when polled once more, so hyper queues the message, flushes it (the connection
//! task often runs on the other worker thread at once), and then sends an empty DATA frame with
//! END_STREAM in a second write. The server cannot answer before that second frame arrives (a
//! unary handler waits for the end of the request), so every unary call costs the network, the
//! peer's reads and its wake-ups twice. Measured with `strace` on the keeper benchmark: 1 460 of
//! 3 474 client writes were those 9-byte frames (docs/benchmarks.md, session 12).
//!
//! [`OneWrite`] wraps a gRPC channel and gives hyper a body that looks one frame ahead: when a
//! data frame is taken and the encoded body is already exhausted, it says so, and hyper sends the
//! frame with END_STREAM. Streaming bodies are unchanged: a frame is never held back waiting for
//! the next one, only a frame that is already ready is looked at.

use std::pin::Pin;
use std::task::Context;
use std::task::Poll;

use http_body::Frame;
use tonic::body::Body;
use tonic::codegen::Bytes;
use tonic::codegen::Service;
use tonic::codegen::StdError;
use tonic::codegen::http;

/// A gRPC channel (any service taking tonic request bodies) whose requests end with their last
/// data frame. Use it in place of the channel: `KvClient::new(OneWrite::new(channel))`.
#[derive(Debug, Clone)]
pub struct OneWrite<S> {
    inner: S,
}

impl<S> OneWrite<S> {
    pub fn new(inner: S) -> Self {
        OneWrite { inner }
    }
}

impl<S> Service<http::Request<Body>> for OneWrite<S>
where
    S: Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        self.inner
            .call(request.map(|body| Body::new(Lookahead::new(body))))
    }
}

/// A body that, after handing out a data frame, polls the inner body once more if it can do so
/// without waiting, so that [`http_body::Body::is_end_stream`] is true as soon as the last frame
/// has been taken.
struct Lookahead<B> {
    inner: B,
    /// A frame (or error) already taken from `inner`, handed out on the next poll.
    next: Option<Result<Frame<Bytes>, StdError>>,
    /// `inner` has returned `None`: nothing follows `next`.
    done: bool,
}

impl<B> Lookahead<B> {
    fn new(inner: B) -> Self {
        Lookahead {
            inner,
            next: None,
            done: false,
        }
    }
}

impl<B> http_body::Body for Lookahead<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<StdError>,
{
    type Data = Bytes;
    type Error = StdError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StdError>>> {
        let this = self.get_mut();
        let current = match this.next.take() {
            Some(frame) => frame,
            None if this.done => return Poll::Ready(None),
            None => match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(frame)) => frame.map_err(Into::into),
                Poll::Ready(None) => {
                    this.done = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            },
        };
        // Only a data frame that may be the last one is worth a look ahead; trailers end the
        // body anyway and an error ends the request. A `Pending` here registered the waker, so
        // hyper is woken for the next frame as it would have been.
        if current.as_ref().is_ok_and(Frame::is_data) && !this.done {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(frame)) => this.next = Some(frame.map_err(Into::into)),
                Poll::Ready(None) => this.done = true,
                Poll::Pending => {}
            }
        }
        Poll::Ready(Some(current))
    }

    fn is_end_stream(&self) -> bool {
        self.next.is_none() && (self.done || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let mut hint = self.inner.size_hint();
        if let Some(Ok(frame)) = &self.next
            && let Some(data) = frame.data_ref()
        {
            let held = data.len() as u64;
            hint.set_lower(hint.lower() + held);
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper + held);
            }
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use http_body::Body as _;

    use super::*;

    /// A body that yields its frames one per poll, returning `Pending` (and waking at once)
    /// wherever the script says so.
    struct Scripted {
        steps: VecDeque<Option<Frame<Bytes>>>,
        ended: bool,
    }

    impl Scripted {
        /// `None` in `steps` is one `Pending`.
        fn new(steps: Vec<Option<Frame<Bytes>>>) -> Self {
            Scripted {
                steps: steps.into(),
                ended: false,
            }
        }
    }

    impl http_body::Body for Scripted {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match self.steps.pop_front() {
                Some(Some(frame)) => Poll::Ready(Some(Ok(frame))),
                Some(None) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                None => {
                    self.ended = true;
                    Poll::Ready(None)
                }
            }
        }

        // Like tonic's encoded body: it knows it has ended only once polled past the end.
        fn is_end_stream(&self) -> bool {
            self.ended
        }
    }

    fn data(s: &'static str) -> Option<Frame<Bytes>> {
        Some(Frame::data(Bytes::from_static(s.as_bytes())))
    }

    /// Polls `body` to the end, recording each frame's data and whether the body said it had
    /// ended right after that frame was taken (what hyper uses to set END_STREAM).
    fn drain<B: http_body::Body<Data = Bytes> + Unpin>(mut body: B) -> Vec<(Bytes, bool)> {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut seen = Vec::new();
        loop {
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let bytes = frame
                        .into_data()
                        .unwrap_or_else(|_| panic!("only data frames are scripted"));
                    seen.push((bytes, body.is_end_stream()));
                }
                Poll::Ready(Some(Err(_))) => panic!("no errors scripted"),
                Poll::Ready(None) => return seen,
                Poll::Pending => {}
            }
        }
    }

    #[test]
    fn a_single_message_ends_the_body_with_its_frame() {
        // Without the look ahead the frame is taken while the body has not ended: two writes.
        assert_eq!(
            drain(Scripted::new(vec![data("put")])),
            vec![(Bytes::from_static(b"put"), false)]
        );
        assert_eq!(
            drain(Lookahead::new(Scripted::new(vec![data("put")]))),
            vec![(Bytes::from_static(b"put"), true)]
        );
    }

    #[test]
    fn frames_of_a_stream_come_out_in_order_and_only_the_last_ends_it() {
        let body = Lookahead::new(Scripted::new(vec![
            data("a"),
            data("b"),
            None,
            data("c"),
            None,
            data("d"),
        ]));
        assert_eq!(
            drain(body),
            vec![
                (Bytes::from_static(b"a"), false),
                (Bytes::from_static(b"b"), false),
                (Bytes::from_static(b"c"), false),
                (Bytes::from_static(b"d"), true),
            ]
        );
    }

    #[test]
    fn a_frame_is_not_held_back_when_the_next_is_not_ready() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut body = Lookahead::new(Scripted::new(vec![data("a"), None, data("b")]));
        let first = Pin::new(&mut body).poll_frame(&mut cx);
        assert!(matches!(first, Poll::Ready(Some(Ok(ref f))) if f.data_ref().is_some()));
        assert!(!body.is_end_stream());
        let held = body.size_hint();
        assert_eq!(
            held.lower(),
            0,
            "nothing is buffered while the inner body waits"
        );
    }

    #[test]
    fn a_buffered_frame_counts_in_the_size_hint() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut body = Lookahead::new(Scripted::new(vec![data("ab"), data("cde")]));
        let _ = Pin::new(&mut body).poll_frame(&mut cx);
        assert_eq!(body.size_hint().lower(), 3);
    }
}
