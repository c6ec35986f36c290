//! One device connection from accept to close: handshake (first frame `auth` within the
//! handshake timeout), registration, `welcome`, then one task that reads frames, writes the
//! outbound queue and answers pings. Idle connections (3 missed heartbeats) are closed by the
//! hub's sweeper through the outbox, like kicks.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use longlink_client::Frame;
use longlink_proto::clientpb;
use tokio_util::sync::CancellationToken;

use crate::admission::Permit;
use crate::auth;
use crate::error::code;
use crate::hub::Conn;
use crate::hub::Hub;
use crate::hub::Stats;
use crate::outbox::Closing;
use crate::outbox::Next;
use crate::wire::LINGER;
use crate::wire::ReadError;
use crate::wire::Wire;

/// Sends an error frame (best effort, bounded in time) and closes.
pub async fn refuse<W: Wire>(mut wire: W, code: &str, message: &str) {
    tracing::debug!(code, message, "closing connection with error");
    let frame = Frame::error(code, message).encode();
    let _ = tokio::time::timeout(LINGER, wire.write_frame(&frame)).await;
    wire.close().await;
}

/// Why a handshake did not produce a session.
enum Refused {
    /// Answer with this error and close.
    Error(&'static str, String),
    /// The socket is gone; nothing to send.
    Gone,
}

fn timeout_refusal(ms: u64) -> Refused {
    Refused::Error(
        code::HANDSHAKE_TIMEOUT,
        format!("no auth frame within handshake_timeout_ms = {ms}"),
    )
}

/// Reads and checks `auth`, registers the session and queues `welcome`. Returns the
/// connection and the frames that came after `auth` in the same read.
async fn handshake<W: Wire>(
    hub: &Hub,
    wire: &mut W,
    ip: IpAddr,
    shutdown: &CancellationToken,
) -> Result<(Arc<Conn>, Vec<Frame>), Refused> {
    let limits = hub.limits();
    let mut frames = Vec::new();
    // Part of a frame may arrive first; the whole auth frame must be in within the timeout.
    let read = tokio::select! {
        r = tokio::time::timeout(limits.handshake_timeout(), async {
            while frames.is_empty() {
                wire.read_frames(|| hub.limits().max_frame_bytes, &mut frames).await?;
            }
            Ok::<_, ReadError>(())
        }) => r,
        _ = shutdown.cancelled() => {
            return Err(Refused::Error(code::SHUTTING_DOWN, "room is shutting down".into()));
        }
    };
    match read {
        Err(_) => return Err(timeout_refusal(limits.handshake_timeout_ms)),
        Ok(Err(ReadError::Frame(e))) => return Err(Refused::Error(e.code(), e.to_string())),
        Ok(Err(_)) => return Err(Refused::Gone),
        Ok(Ok(())) => {}
    }
    let mut rest = frames.into_iter();
    let token = match rest.next() {
        Some(Frame::Auth(a)) => a.token,
        Some(other) => {
            Stats::add(&hub.stats.auth_failures, 1);
            let msg = format!("the first frame must be auth, got {:?}", other.kind());
            return Err(Refused::Error(code::AUTH_REQUIRED, msg));
        }
        None => return Err(Refused::Gone),
    };
    let identity = match auth::verify(&token, &hub.apps()) {
        Ok(id) => id,
        Err(e) => {
            Stats::add(&hub.stats.auth_failures, 1);
            metrics::counter!("room_auth_failures_total", "code" => e.code).increment(1);
            return Err(Refused::Error(e.code, e.message));
        }
    };
    let conn = hub.new_conn(identity, ip, W::WEBSOCKET);
    if let Err(e) = hub.attach(&conn).await {
        let msg = format!("cannot register the session: {e}");
        return Err(Refused::Error(code::UNAVAILABLE, msg));
    }
    let resumed = hub.take_resume(&conn);
    let welcome = Frame::Welcome(clientpb::Welcome {
        conn_id: conn.id,
        heartbeat_s: hub.limits().heartbeat_s,
        room_id: hub.room_id.clone(),
        resumed: resumed as u32,
    });
    hub.send(&conn, &welcome);
    Ok((conn, rest.collect()))
}

/// Runs one accepted connection to its end. `permit` is held until then.
///
/// A plain fn returning an `async move` block, not an `async fn`: an async fn's arguments are
/// stored twice in its future (as arguments, then as the locals they are moved into), and this
/// future lives as long as the connection.
#[allow(clippy::manual_async_fn)]
pub fn serve<W: Wire>(
    hub: Arc<Hub>,
    mut wire: W,
    ip: IpAddr,
    permit: Permit,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send {
    async move {
        // Boxed: the handshake's state is freed once it is done, so a long-lived idle connection's
        // task is only as large as the main loop's state.
        let (conn, leftover) = match Box::pin(handshake(&hub, &mut wire, ip, &shutdown)).await {
            Ok(x) => x,
            Err(Refused::Error(code, message)) => {
                return Box::pin(refuse(wire, code, &message)).await;
            }
            Err(Refused::Gone) => return,
        };
        hub.insert(&conn);
        hub.redeliver(&conn);
        metrics::gauge!("room_connections").increment(1.0);
        tracing::debug!(conn = conn.id, app = %conn.app, user = %conn.user, "authenticated");

        // The hub's sweeper closes every connection it knows at shutdown; one that was inserted
        // after that sweep sees the cancellation here.
        let end = if shutdown.is_cancelled() {
            End::Error(code::SHUTTING_DOWN, "room is shutting down".into())
        } else if let Err(end) = handle_frames(&hub, &conn, leftover) {
            end
        } else {
            run(&hub, &conn, &mut wire).await
        };
        hub.remove(&conn);
        metrics::gauge!("room_connections").decrement(1.0);
        // Boxed, like the handshake: the closing steps (a linger timer, a drain buffer) would
        // otherwise be part of every idle connection's task.
        match end {
            End::Error(code, message) => Box::pin(refuse(wire, code, &message)).await,
            End::Final(frame) => {
                Box::pin(async move {
                    let _ = tokio::time::timeout(LINGER, wire.write_frame(&frame)).await;
                    wire.close().await;
                })
                .await
            }
            End::Quiet => Box::pin(wire.close()).await,
            End::Gone => {}
        }
        // Held until here (an early return drops it with the future).
        drop(permit);
    }
}

/// How the main loop ended.
enum End {
    /// Send this error and close.
    Error(&'static str, String),
    /// Send this encoded frame (kick) and close.
    Final(bytes::Bytes),
    /// Close without a frame (slow consumer: the socket does not drain anyway).
    Quiet,
    /// The socket is gone.
    Gone,
}

fn handle_frames(hub: &Hub, conn: &Conn, frames: Vec<Frame>) -> Result<(), End> {
    for f in frames {
        match f {
            Frame::Ping => {
                hub.send(conn, &Frame::Pong);
            }
            Frame::Ack(a) => hub.ack(conn, &a.ids),
            Frame::Uplink(u) => hub.uplink(conn, u.payload),
            other => {
                return Err(End::Error(
                    code::BAD_FRAME,
                    format!("a client may not send {:?} after auth", other.kind()),
                ));
            }
        }
    }
    Ok(())
}

/// Reads frames and writes the outbound queue until the connection ends. Idle connections and
/// shutdown are handled by the hub's sweeper, which closes the outbox: this future holds no
/// timer and no cancellation waiter, so an idle connection's task stays small.
async fn run<W: Wire>(hub: &Hub, conn: &Conn, wire: &mut W) -> End {
    let mut frames = Vec::new();
    'outer: loop {
        // Write everything queued; a close (kick, slow consumer, idle, shutdown) interrupts a
        // blocked write.
        loop {
            match conn.outbox.pop() {
                Next::Frame(f) => {
                    let written = tokio::select! {
                        r = wire.write_frame(&f) => r,
                        // The next pop returns the close.
                        _ = conn.outbox.closing() => continue 'outer,
                    };
                    if written.is_err() {
                        return End::Gone;
                    }
                    Stats::add(&hub.stats.bytes_out, f.len() as u64);
                    Stats::add(&hub.stats.messages_out, 1);
                }
                Next::Empty => break,
                Next::Close(Closing::SlowConsumer) => return End::Quiet,
                Next::Close(Closing::Final(f)) => return End::Final(f),
            }
        }
        tokio::select! {
            biased;
            _ = conn.outbox.wait() => {}
            r = wire.read_frames(|| hub.limits().max_frame_bytes, &mut frames) => match r {
                Ok(n) => {
                    Stats::add(&hub.stats.bytes_in, n as u64);
                    if !frames.is_empty() {
                        hub.heard(conn);
                        if let Err(end) = handle_frames(hub, conn, std::mem::take(&mut frames)) {
                            return end;
                        }
                    }
                }
                Err(ReadError::Frame(e)) => return End::Error(e.code(), e.to_string()),
                Err(ReadError::Closed) | Err(ReadError::Io(_)) => return End::Gone,
            },
        }
    }
}
