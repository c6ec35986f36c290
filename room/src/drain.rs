//! The `drain` control command (`keeperctl command room ID drain`): kick every connection in
//! waves, each kick carrying the addresses of other live rooms (same transport), then leave
//! discovery and stop the process.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::hub::Hub;

/// Reconnect lists from discovery: (tcp addresses, ws addresses) of rooms other than `me`.
pub fn other_rooms(instances: &[keeper_sdk::InstanceInfo], me: &str) -> (Vec<String>, Vec<String>) {
    let others = instances.iter().filter(|i| i.id != me);
    let tcp = others
        .clone()
        .filter_map(|i| i.addrs.get("tcp").cloned())
        .collect();
    let ws = others.filter_map(|i| i.addrs.get("ws").cloned()).collect();
    (tcp, ws)
}

/// Kicks every connection in waves of `drain_wave_size`, `drain_wave_interval_ms` apart.
/// Returns how many were kicked.
pub async fn drain(hub: &Hub, tcp: &[String], ws: &[String]) -> usize {
    let limits = hub.limits();
    let conns = hub.all_conns();
    let mut kicked = 0;
    for (n, wave) in conns.chunks(limits.drain_wave_size.max(1)).enumerate() {
        if n > 0 {
            tokio::time::sleep(Duration::from_millis(limits.drain_wave_interval_ms)).await;
        }
        for (i, c) in wave.iter().enumerate() {
            let list = if c.ws { ws } else { tcp };
            // Rotate the list so reconnecting clients spread over the other rooms.
            let mut reconnect = list.to_vec();
            if !reconnect.is_empty() {
                let k = (kicked + i) % reconnect.len();
                reconnect.rotate_left(k);
            }
            if hub.kick(c, "drain", &reconnect) {
                kicked += 1;
            }
        }
    }
    kicked
}

/// Serves control commands for this instance until shutdown. `drain` ends the process.
pub async fn serve_commands(
    keeper: keeper_sdk::Keeper,
    id: String,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
) {
    // The keeper may be unreachable right now: keep trying, a room must stay drainable.
    let mut commands = loop {
        match keeper.commands("room", &id).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!("cannot follow control commands yet: {e}");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    loop {
        let cmd = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = commands.next() => c,
        };
        let cmd = match cmd {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("control command stream: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let verb = cmd.verb.clone();
        match verb.as_str() {
            "drain" => {
                let (tcp, ws) = match keeper.discover("room").await {
                    Ok(d) => other_rooms(&d.instances(), &id),
                    Err(e) => {
                        tracing::warn!("drain without reconnect addresses: {e}");
                        (Vec::new(), Vec::new())
                    }
                };
                let kicked = drain(&hub, &tcp, &ws).await;
                // Wait until the kicked connections are gone (bounded).
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                while hub.connection_count() > 0 && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                tracing::info!(kicked, "drained; leaving");
                let _ = cmd.ack(true, format!("drained {kicked} connections")).await;
                shutdown.cancel();
                return;
            }
            other => {
                let _ = cmd.ack(false, format!("unknown command {other:?}")).await;
            }
        }
    }
}
