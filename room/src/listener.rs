//! Accept loops for the device listeners: TCP and WebSocket (`/ws`). Admission (CIDRs, per-IP
//! cap, max connections) is decided at accept, before any byte is read.

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
        tasks.spawn(async move {
            start(kind, stream, peer, hub, admission, shutdown).await;
        });
    }
}

async fn start(
    kind: Kind,
    stream: TcpStream,
    peer: SocketAddr,
    hub: Arc<Hub>,
    admission: Arc<Admission>,
    shutdown: CancellationToken,
) {
    let limits = hub.limits();
    let admitted = admission.admit(peer.ip(), &limits);
    if admitted.is_err() {
        Stats::add(&hub.stats.rejected, 1);
        metrics::counter!("room_rejected_connections_total").increment(1);
    }
    match kind {
        Kind::Tcp => {
            let wire = TcpWire::new(stream);
            match admitted {
                Ok(permit) => connection::serve(hub, wire, peer.ip(), permit, shutdown).await,
                Err(r) => connection::refuse(wire, r.code, &r.message).await,
            }
        }
        Kind::Ws => {
            let config = WebSocketConfig::default()
                .read_buffer_size(limits.ws_buffer_bytes)
                .write_buffer_size(0)
                .max_write_buffer_size(
                    limits.ws_buffer_bytes + WS_HARD_MAX.max(limits.max_frame_bytes) * 2,
                )
                .max_message_size(Some(WS_HARD_MAX.max(limits.max_frame_bytes)))
                .max_frame_size(Some(WS_HARD_MAX.max(limits.max_frame_bytes)));
            // The signature is tungstenite's callback type.
            #[allow(clippy::result_large_err)]
            let only_ws_path = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
                if req.uri().path() == "/ws" {
                    Ok(resp)
                } else {
                    let mut e =
                        ErrorResponse::new(Some("not found: the WebSocket path is /ws".into()));
                    *e.status_mut() = StatusCode::NOT_FOUND;
                    Err(e)
                }
            };
            let upgraded = tokio::time::timeout(
                limits.handshake_timeout(),
                tokio_tungstenite::accept_hdr_async_with_config(stream, only_ws_path, Some(config)),
            )
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
                Err(r) => connection::refuse(wire, r.code, &r.message).await,
            }
        }
    }
}
