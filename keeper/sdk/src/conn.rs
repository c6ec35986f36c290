//! Connections to the keeper endpoints: one lazy gRPC channel per endpoint, a "current" one that
//! calls use, and failover to the next endpoint when a call finds the current one unavailable.

use std::sync::Mutex;
use std::time::Duration;

use longlink_proto::OneWrite;
use tokio::time::Instant;
use tonic::transport::Endpoint;

use crate::backoff::Backoff;
use crate::error::Error;
use crate::error::Result;

/// A channel to one keeper endpoint whose unary requests go out in one write (see
/// `longlink_proto::OneWrite`).
pub type Channel = OneWrite<tonic::transport::Channel>;

/// How long a connect attempt to one endpoint may take before we try the next.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 pings on idle connections, so a watch or keep-alive stream on a node that hangs
/// (rather than closing its socket) is noticed and moved to another endpoint.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(3);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// The endpoints and which one calls go to.
pub(crate) struct Conn {
    /// `(address as given, channel)`; channels connect lazily and reconnect by themselves.
    channels: Vec<(String, Channel)>,
    /// Index into `channels` and a generation that grows with every failover, so that many
    /// calls failing on the same endpoint move the cursor once, not once each.
    current: Mutex<(usize, u64)>,
    pub(crate) request_timeout: Duration,
}

/// Turns `host:port` or `http://host:port` into a URI.
pub(crate) fn normalize_endpoint(endpoint: &str) -> Result<String> {
    let e = endpoint.trim();
    if e.is_empty() {
        return Err(Error::Invalid("empty keeper endpoint".into()));
    }
    let uri = if e.starts_with("http://") || e.starts_with("https://") {
        e.to_string()
    } else {
        format!("http://{e}")
    };
    uri.parse::<tonic::transport::Uri>()
        .map_err(|err| Error::Invalid(format!("keeper endpoint {endpoint:?}: {err}")))?;
    Ok(uri)
}

impl Conn {
    pub(crate) fn new(endpoints: &[String], request_timeout: Duration) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(Error::Invalid("no keeper endpoints given".into()));
        }
        if request_timeout.is_zero() {
            return Err(Error::Invalid("request_timeout must be above zero".into()));
        }
        let mut channels = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            let uri = normalize_endpoint(e)?;
            let channel = Endpoint::from_shared(uri)
                .map_err(|err| Error::Invalid(format!("keeper endpoint {e:?}: {err}")))?
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(H2_KEEPALIVE_INTERVAL)
                .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
                .connect_lazy();
            channels.push((e.clone(), OneWrite::new(channel)));
        }
        Ok(Self {
            channels,
            current: Mutex::new((0, 0)),
            request_timeout,
        })
    }

    /// The cursor. It holds two integers that are always valid, so a panic elsewhere while
    /// holding the lock (poisoning it) leaves nothing to repair: carry on.
    fn cursor(&self) -> std::sync::MutexGuard<'_, (usize, u64)> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current channel and its generation (pass it to [`Conn::fail`]).
    pub(crate) fn channel(&self) -> (Channel, u64) {
        let (index, generation) = *self.cursor();
        (self.channels[index].1.clone(), generation)
    }

    /// The endpoint calls currently go to.
    pub(crate) fn endpoint(&self) -> String {
        let (index, _) = *self.cursor();
        self.channels[index].0.clone()
    }

    /// Moves to the next endpoint, unless another caller already moved on from `generation`.
    pub(crate) fn fail(&self, generation: u64) {
        let mut cur = self.cursor();
        if cur.1 == generation {
            let from = cur.0;
            cur.0 = (cur.0 + 1) % self.channels.len();
            cur.1 += 1;
            tracing::debug!(
                from = %self.channels[from].0,
                to = %self.channels[cur.0].0,
                "keeper endpoint failover"
            );
        }
    }

    /// Runs `attempt` on the current channel until it succeeds, fails with a non-retryable
    /// status, or the request timeout runs out; retryable failures move to the next endpoint
    /// and back off briefly. Writes may therefore be applied twice; every write the SDK makes
    /// is idempotent or guarded by a compare.
    pub(crate) async fn call<T, F, Fut>(&self, what: &str, mut attempt: F) -> Result<T>
    where
        F: FnMut(Channel) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let timeout = self.request_timeout;
        let deadline = Instant::now() + timeout;
        let per_attempt = (timeout / 2).max(Duration::from_secs(1)).min(timeout);
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
        let mut last: Option<String> = None;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(match last {
                    Some(l) => {
                        Error::Unavailable(format!("{what}: {l} (gave up after {timeout:?})"))
                    }
                    None => Error::Timeout {
                        what: what.to_string(),
                        after: timeout,
                    },
                });
            }
            let (channel, generation) = self.channel();
            let endpoint = self.endpoint();
            let budget = per_attempt.min(deadline - now);
            match tokio::time::timeout(budget, attempt(channel)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(status)) if retryable(&status) => {
                    last = Some(format!("{endpoint}: {}", status.message()));
                    self.fail(generation);
                }
                Ok(Err(status)) => return Err(Error::from_status(status)),
                Err(_) => {
                    last = Some(format!("{endpoint}: no answer within {budget:?}"));
                    self.fail(generation);
                }
            }
            let pause = backoff
                .next_delay()
                .min(deadline.saturating_duration_since(Instant::now()));
            tokio::time::sleep(pause).await;
        }
    }
}

/// Statuses after which another endpoint or a later attempt may succeed: the node is down or
/// unreachable, has no leader, or the connection broke mid-call.
pub(crate) fn retryable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
    )
}

impl Error {
    /// Maps a non-retryable status to the SDK's error.
    pub(crate) fn from_status(status: tonic::Status) -> Error {
        match status.code() {
            tonic::Code::InvalidArgument => Error::Invalid(status.message().to_string()),
            _ => Error::Status(status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_normalized() {
        assert_eq!(
            normalize_endpoint("127.0.0.1:7379").unwrap(),
            "http://127.0.0.1:7379"
        );
        assert_eq!(normalize_endpoint("http://h:1").unwrap(), "http://h:1");
        assert!(matches!(normalize_endpoint(" "), Err(Error::Invalid(_))));
        assert!(matches!(
            normalize_endpoint("bad host:x"),
            Err(Error::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn failover_moves_once_per_generation() {
        let conn = Conn::new(
            &["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()],
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(conn.endpoint(), "127.0.0.1:1");
        let (_, g) = conn.channel();
        conn.fail(g);
        conn.fail(g);
        assert_eq!(conn.endpoint(), "127.0.0.1:2");
        let (_, g) = conn.channel();
        conn.fail(g);
        assert_eq!(conn.endpoint(), "127.0.0.1:1");
    }

    #[tokio::test]
    async fn calls_to_dead_endpoints_end_unavailable_within_the_timeout() {
        let conn = Conn::new(&["127.0.0.1:1".to_string()], Duration::from_millis(300)).unwrap();
        let start = std::time::Instant::now();
        let r: Result<()> = conn
            .call("probe", |_ch| async {
                Err(tonic::Status::unavailable("down"))
            })
            .await;
        assert!(matches!(r, Err(Error::Unavailable(m)) if m.contains("probe")));
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
