//! Accept loops for the device listeners: TCP and WebSocket (`/ws`). Admission (CIDRs, per-IP
//! cap, max connections) is decided at accept, before any byte is read.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::server::ErrorResponse;
use tokio_tungstenite::tungstenite::handshake::server::Request;
use tokio_tungstenite::tungstenite::handshake::server::Response;
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::Admission;
use crate::connection;
use crate::hub::Hub;
use crate::hub::Stats;
use crate::wire::TcpWire;
use crate::wire::WsWire;

/// Which listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Ws,
}

/// WebSocket messages are also capped by the transport at this size or the live max frame at
/// accept time, whichever is larger; the live limit is enforced exactly by the driver.
const WS_HARD_MAX: usize = 1 << 20;

/// Accepts connections until `shutdown`; every connection runs on `tasks`.
pub async fn accept_loop(
    kind: Kind,
    listener: TcpListener,
    hub: Arc<Hub>,
    admission: Arc<Admission>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (hub, admission, shutdown) = (hub.clone(), admission.clone(), shutdown.clone());
        // Separate futures per transport: a TCP connection's task must not carry the space of
        // the WebSocket handshake state.
        match kind {
            Kind::Tcp => {
                tasks.spawn(start_tcp(stream, peer, hub, admission, shutdown));
            }
            Kind::Ws => {
                tasks.spawn(start_ws(stream, peer, hub, admission, shutdown));
            }
        }
    }
}

fn admit(
    hub: &Hub,
    admission: &Arc<Admission>,
    peer: SocketAddr,
    limits: &Arc<crate::config::RoomLimits>,
) -> Result<crate::admission::Permit, crate::admission::Refusal> {
    let admitted = admission.admit(peer.ip(), limits);
    if admitted.is_err() {
        Stats::add(&hub.stats.rejected, 1);
        metrics::counter!("room_rejected_connections_total").increment(1);
    }
    admitted
}

/// Not an `async fn`, for the reason given at [`connection::serve`]: admission happens before
/// the task's future is built, so the future is only the connection's.
fn start_tcp(
    stream: TcpStream,
    peer: SocketAddr,
    hub: Arc<Hub>,
    admission: Arc<Admission>,
    shutdown: CancellationToken,
) -> futures::future::Either<
    impl Future<Output = ()> + Send,
    std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
> {
    let limits = hub.limits();
    let wire = TcpWire::new(stream);
    match admit(&hub, &admission, peer, &limits) {
        Ok(permit) => {
            futures::future::Either::Left(connection::serve(hub, wire, peer.ip(), permit, shutdown))
        }
        Err(r) => futures::future::Either::Right(Box::pin(async move {
            connection::refuse(wire, r.code, &r.message).await
        })),
    }
}

async fn start_ws(
    stream: TcpStream,
    peer: SocketAddr,
    hub: Arc<Hub>,
    admission: Arc<Admission>,
    shutdown: CancellationToken,
) {
    let limits = hub.limits();
    let admitted = admit(&hub, &admission, peer, &limits);
    let config = WebSocketConfig::default()
        .read_buffer_size(limits.ws_buffer_bytes)
        .write_buffer_size(0)
        .max_write_buffer_size(limits.ws_buffer_bytes + WS_HARD_MAX.max(limits.max_frame_bytes) * 2)
        .max_message_size(Some(WS_HARD_MAX.max(limits.max_frame_bytes)))
        .max_frame_size(Some(WS_HARD_MAX.max(limits.max_frame_bytes)));
    // The signature is tungstenite's callback type.
    #[allow(clippy::result_large_err)]
    let only_ws_path = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() == "/ws" {
            Ok(resp)
        } else {
            let mut e = ErrorResponse::new(Some("not found: the WebSocket path is /ws".into()));
            *e.status_mut() = StatusCode::NOT_FOUND;
            Err(e)
        }
    };
    // Boxed: the upgrade's state is freed once it is done (see the TCP path).
    let upgraded = Box::pin(tokio::time::timeout(
        limits.handshake_timeout(),
        tokio_tungstenite::accept_hdr_async_with_config(stream, only_ws_path, Some(config)),
    ))
    .await;
    let ws = match upgraded {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            tracing::debug!(%peer, "websocket handshake failed: {e}");
            return;
        }
        Err(_) => return,
    };
    let wire = WsWire::new(ws);
    match admitted {
        Ok(permit) => connection::serve(hub, wire, peer.ip(), permit, shutdown).await,
        Err(r) => Box::pin(connection::refuse(wire, r.code, &r.message)).await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use longlink_common::AppsConfig;
    use tokio::sync::watch;

    use super::*;
    use crate::config::RoomLimits;

    /// The per-connection task is the largest fixed cost of an idle connection; keep it small.
    #[tokio::test]
    async fn connection_task_size_is_bounded() {
        let (_l, lr) = watch::channel(Arc::new(RoomLimits::default()));
        let (_a, ar) = watch::channel(Arc::new(AppsConfig::default()));
        let hub = Hub::new("r".into(), lr, ar, None);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let tcp = start_tcp(
            stream,
            peer,
            hub.clone(),
            Admission::new(),
            CancellationToken::new(),
        );
        let size = std::mem::size_of_val(&tcp);
        eprintln!("connection task future: {size} bytes");
        // 520 bytes in a debug build, 512 in release (1680 and 1624 before the closing paths
        // were boxed, the idle timer and shutdown waiter moved to the hub's sweeper, and the
        // task stopped being an async fn, which stores its arguments twice).
        assert!(size <= 640, "connection task grew to {size} bytes");
    }
}
