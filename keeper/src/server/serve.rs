//! The keeper's HTTP/2 server: accepts connections and hands each gRPC request to its service.
//!
//! tonic's own server puts every request through an axum router and a stack of tower layers
//! (load shedding, concurrency limit, grpc-timeout, error recovery), most of them unused here.
//! With every client on one node, that plumbing took ~9% of the node's CPU at 64 clients, two
//! thirds of what the Put handler itself cost (docs/decisions.md). The keeper's services are
//! fixed, so the request path's service name picks the service directly.
//!
//! The same port serves raft-store's peer links (plain framed TCP for replication and forwarded
//! writes): a connection whose first byte marks a link goes to the Raft node instead of HTTP/2.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::task::Context;
use std::task::Poll;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::rt::TokioTimer;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use longlink_proto::ConnectionTasks;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tonic::body::Body;
use tonic::codegen::BoxFuture;
use tonic::codegen::Service;
use tonic::codegen::http;
use tonic::server::NamedService;

/// How often an idle connection is pinged, to notice peers that vanished without closing it.
const KEEPALIVE: Duration = Duration::from_secs(10);
/// How long the server pauses accepting after an accept error (out of file descriptors, say),
/// instead of spinning on it.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Turns a tonic service (a generated `*Server`) into a route under its name.
pub(crate) fn route<S>(service: S) -> (&'static str, RouteFn)
where
    S: Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<Body>,
            Error = Infallible,
            Future = BoxFuture<http::Response<Body>, Infallible>,
        > + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
{
    let call: RouteFn = Arc::new(move |request| service.clone().call(request));
    (S::NAME, call)
}

/// Calls one service with one request.
pub(crate) type RouteFn = Arc<
    dyn Fn(http::Request<hyper::body::Incoming>) -> BoxFuture<http::Response<Body>, Infallible>
        + Send
        + Sync,
>;

/// The services, by name (`etcdserverpb.KV`, ...): a request for `/<name>/<method>` goes to the
/// service `name`; any other path is answered `Unimplemented`, as a gRPC server does.
#[derive(Clone)]
pub(crate) struct Router {
    routes: Arc<Vec<(&'static str, RouteFn)>>,
}

impl Router {
    pub(crate) fn new(routes: Vec<(&'static str, RouteFn)>) -> Self {
        Self {
            routes: Arc::new(routes),
        }
    }
}

impl Service<http::Request<hyper::body::Incoming>> for Router {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<http::Response<Body>, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<hyper::body::Incoming>) -> Self::Future {
        let name = request
            .uri()
            .path()
            .strip_prefix('/')
            .and_then(|path| path.split_once('/'))
            .map(|(name, _)| name);
        let route = name.and_then(|name| self.routes.iter().find(|(n, _)| *n == name));
        match route {
            Some((_, call)) => call(request),
            None => {
                let path = request.uri().path().to_string();
                Box::pin(async move {
                    Ok(tonic::Status::unimplemented(format!("no such method: {path}")).into_http())
                })
            }
        }
    }
}

/// Serves one peer link connection (`raft_store::is_link`), returning when it ends.
pub(crate) type LinkFn =
    Arc<dyn Fn(TcpStream) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// Serves `router` on `listener` until `stop` completes, then stops accepting, tells every
/// connection to finish (HTTP/2 GOAWAY: requests in progress complete, no new ones start) and
/// returns once they have. Peer link connections go to `links`; they end with the Raft node's
/// peer streams, not here.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    links: Option<LinkFn>,
    stop: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        // Nagle's algorithm plus delayed ACKs would hold small responses back ~40 ms.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "setting TCP_NODELAY failed");
        }
        let (router, links) = (router.clone(), links.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            if let Some(links) = links {
                match raft_store::is_link(&stream).await {
                    Ok(true) => return links(stream).await,
                    Ok(false) => {}
                    Err(error) => {
                        tracing::debug!(%peer, %error, "connection failed before its first byte");
                        return;
                    }
                }
            }
            // The request handlers run in this task (docs/decisions.md).
            let handlers = ConnectionTasks::default();
            let mut http = hyper::server::conn::http2::Builder::new(handlers.clone());
            // No `date` header: gRPC clients ignore it (etcd sends none), and hyper would read
            // the clock and allocate it for every response.
            http.timer(TokioTimer::new())
                .keep_alive_interval(Some(KEEPALIVE))
                .auto_date_header(false);
            let connection =
                http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router));
            if let Err(error) = handlers.drive(watcher.watch(connection)).await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use longlink_proto::etcdserverpb::LeaseGrantRequest;
    use longlink_proto::etcdserverpb::RangeRequest;
    use longlink_proto::etcdserverpb::kv_client::KvClient;
    use longlink_proto::etcdserverpb::lease_client::LeaseClient;
    use tokio::sync::oneshot;
    use tonic::Code;

    use super::*;

    /// A server with `kv` as its only route, one client connection to it, and what stops it.
    struct TestServer {
        channel: tonic::transport::Channel,
        stop: oneshot::Sender<()>,
        server: tokio::task::JoinHandle<()>,
    }

    impl TestServer {
        async fn start(kv: RouteFn) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let router = Router::new(vec![("etcdserverpb.KV", kv)]);
            let (stop, stopped) = oneshot::channel::<()>();
            let server = tokio::spawn(serve(listener, router, None, async {
                let _ = stopped.await;
            }));
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            Self {
                channel,
                stop,
                server,
            }
        }

        async fn range(&self) -> tonic::Status {
            KvClient::new(self.channel.clone())
                .range(RangeRequest::default())
                .await
                .unwrap_err()
        }

        /// Stopping ends the server once its connection has closed.
        async fn stop(self) {
            self.stop.send(()).unwrap();
            drop(self.channel);
            tokio::time::timeout(Duration::from_secs(10), self.server)
                .await
                .expect("the server stops within 10 s")
                .unwrap();
        }
    }

    fn answer(message: &'static str) -> BoxFuture<http::Response<Body>, Infallible> {
        Box::pin(async move { Ok(tonic::Status::already_exists(message).into_http()) })
    }

    #[tokio::test]
    async fn requests_reach_the_service_their_path_names_and_others_are_unimplemented() {
        let server = TestServer::start(Arc::new(|_| answer("the kv route"))).await;
        let status = server.range().await;
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
        assert_eq!(status.message(), "the kv route");
        let status = LeaseClient::new(server.channel.clone())
            .lease_grant(LeaseGrantRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
        assert_eq!(
            status.message(),
            "no such method: /etcdserverpb.Lease/LeaseGrant"
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn the_requests_of_one_connection_are_handled_concurrently() {
        // Each handler waits for the other: served one after the other, neither would finish.
        let both = Arc::new(tokio::sync::Barrier::new(2));
        let server = TestServer::start(Arc::new(move |_| {
            let both = both.clone();
            Box::pin(async move {
                both.wait().await;
                answer("met").await
            })
        }))
        .await;
        let (first, second) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(server.range(), server.range())
        })
        .await
        .expect("two requests on one connection are answered together");
        for status in [first, second] {
            assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
            assert_eq!(status.message(), "met");
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn stopping_lets_the_requests_in_progress_finish() {
        let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let permit = release.clone();
        let server = TestServer::start(Arc::new(move |_| {
            let (started_tx, release) = (started_tx.clone(), permit.clone());
            Box::pin(async move {
                started_tx.send(()).unwrap();
                let _ = release.acquire().await.unwrap();
                answer("finished after the stop").await
            })
        }))
        .await;
        let channel = server.channel.clone();
        let request = tokio::spawn(async move {
            KvClient::new(channel)
                .range(RangeRequest::default())
                .await
                .unwrap_err()
        });
        started.recv().await.unwrap();
        server.stop.send(()).unwrap();
        release.add_permits(1);
        let status = request.await.unwrap();
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
        assert_eq!(status.message(), "finished after the stop");
        drop(server.channel);
        tokio::time::timeout(Duration::from_secs(10), server.server)
            .await
            .expect("the server stops within 10 s once its connection closed")
            .unwrap();
    }
}
