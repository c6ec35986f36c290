//! Live config from the keeper: the typed documents `room` ([`RoomLimits`]) and `apps`
//! ([`AppsConfig`]) followed with the SDK and forwarded into the watch channels the room reads.
//! A document that parses but fails validation is not applied (the previous one stays).

use std::sync::Arc;

use longlink_common::AppsConfig;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::Sources;
use crate::config::RoomLimits;
use crate::error::Error;
use crate::error::Result;

/// Follows `service`'s document, forwarding every valid version into `tx`.
async fn follow<T>(
    mut handle: keeper_sdk::ConfigHandle<T>,
    tx: watch::Sender<Arc<T>>,
    validate: fn(&T) -> std::result::Result<(), String>,
    service: &'static str,
    shutdown: CancellationToken,
) where
    T: Send + Sync + 'static,
{
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = handle.changed() => r,
        };
        match next {
            Ok(v) => match validate(&v) {
                Ok(()) => {
                    tracing::info!(service, version = handle.version(), "config applied");
                    tx.send_replace(v);
                }
                Err(e) => tracing::warn!(service, "config not applied: {e}"),
            },
            Err(e) => {
                tracing::warn!(service, "config watch failed: {e}");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

/// Loads `room` and `apps` (defaults until pushed) and keeps them live.
pub async fn from_keeper(
    keeper: &keeper_sdk::Keeper,
    shutdown: CancellationToken,
) -> Result<Sources> {
    let limits = keeper
        .config_or_default::<RoomLimits>("room")
        .await
        .map_err(|e| Error::Keeper(format!("config room: {e}")))?;
    let apps = keeper
        .config_or_default::<AppsConfig>("apps")
        .await
        .map_err(|e| Error::Keeper(format!("config apps: {e}")))?;
    let first_limits = limits.current();
    if let Err(e) = first_limits.validate() {
        return Err(Error::Config(e.to_string()));
    }
    let (ltx, lrx) = watch::channel(first_limits);
    let (atx, arx) = watch::channel(apps.current());
    tokio::spawn(follow(
        limits,
        ltx,
        |l: &RoomLimits| l.validate().map_err(|e| e.to_string()),
        "room",
        shutdown.clone(),
    ));
    tokio::spawn(follow(
        apps,
        atx,
        |a: &AppsConfig| a.validate().map_err(|e| e.to_string()),
        "apps",
        shutdown,
    ));
    Ok(Sources {
        limits: lrx,
        apps: arx,
    })
}
