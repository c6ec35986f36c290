//! Live config from the keeper: the typed documents `room` ([`RoomLimits`]) and `apps`
//! ([`AppsConfig`]) followed with the SDK and forwarded into the watch channels the room reads.
//! A document that parses but fails validation is not applied (the previous one stays) and the
//! failure is reported under `/applied/<service>/<id>`, where `keeperctl config push --wait` sees it.

use longlink_common::AppsConfig;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::Sources;
use crate::config::RoomLimits;
use crate::error::Error;
use crate::error::Result;

/// Loads `room` and `apps` (defaults until pushed) and keeps them live.
pub async fn from_keeper(
    keeper: &keeper_sdk::Keeper,
    shutdown: CancellationToken,
) -> Result<Sources> {
    let limits = keeper
        .config_or_default_with::<RoomLimits>("room", |l| l.validate().map_err(|e| e.to_string()))
        .await
        .map_err(|e| Error::Keeper(format!("config room: {e}")))?;
    let apps = keeper
        .config_or_default_with::<AppsConfig>("apps", |a| a.validate().map_err(|e| e.to_string()))
        .await
        .map_err(|e| Error::Keeper(format!("config apps: {e}")))?;
    let (ltx, lrx) = watch::channel(limits.current());
    let (atx, arx) = watch::channel(apps.current());
    // Only versions that passed validation arrive; the SDK reports the others.
    tokio::spawn(limits.for_each(shutdown.clone(), move |v, _| {
        ltx.send_replace(v);
    }));
    tokio::spawn(apps.for_each(shutdown, move |v, _| {
        atx.send_replace(v);
    }));
    Ok(Sources {
        limits: lrx,
        apps: arx,
    })
}
