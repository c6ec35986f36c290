//! Running a center: [`run`] connects to the keeper, turns the `apps` config, the `room` and
//! `register` instances and the slot map into the watch channels [`Center`] reads (the one
//! place the keeper is wired in), serves HTTP and gRPC, and registers as service `center`.
//! [`serve`] does the serving part alone, for tests that feed the channels themselves.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keeper_sdk::ConnectOptions;
use keeper_sdk::Instance;
use keeper_sdk::InstanceInfo;
use keeper_sdk::Keeper;
use longlink_common::AppsConfig;
use longlink_common::SlotMap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::CenterConfig;
use crate::config::CenterTuning;
use crate::error::Error;
use crate::error::Result;
use crate::grpc::Grpc;
use crate::rooms;
use crate::rooms::Room;
use crate::service::Center;
use crate::service::Inputs;

/// Where the slot map lives (written by register's slot controller).
pub const SLOTS_KEY: &str = "/register/slots";

/// Listeners bound before anything else, so that a taken port fails at once.
pub struct Listeners {
    pub http: TcpListener,
    pub grpc: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &CenterConfig) -> Result<Listeners> {
        let http = TcpListener::bind(config.http)
            .await
            .map_err(|source| Error::Bind {
                addr: config.http,
                source,
            })?;
        let grpc = TcpListener::bind(config.grpc)
            .await
            .map_err(|source| Error::Bind {
                addr: config.grpc,
                source,
            })?;
        Ok(Listeners { http, grpc })
    }
}

fn keeper_error(e: keeper_sdk::Error) -> Error {
    Error::Keeper(e.to_string())
}

/// Runs a center until `shutdown` is cancelled: binds, connects to the keeper, registers as
/// `center` in discovery, serves, then deregisters and drains.
pub async fn run(config: CenterConfig, shutdown: CancellationToken) -> Result<()> {
    config.validate().map_err(Error::Config)?;
    let listeners = Listeners::bind(&config).await?;
    let mut options = ConnectOptions::new(&config.keeper);
    options.instance = Some(config.id.clone());
    let keeper = Keeper::connect_with(options).await.map_err(keeper_error)?;
    let inputs = keeper_inputs(&keeper, &shutdown).await?;
    let http_addr = listeners
        .http
        .local_addr()
        .map_err(|e| Error::Internal(e.to_string()))?;
    let grpc_addr = listeners
        .grpc
        .local_addr()
        .map_err(|e| Error::Internal(e.to_string()))?;
    let instance = Instance {
        id: config.id.clone(),
        addrs: BTreeMap::from([
            (
                "http".to_owned(),
                config
                    .advertise_http
                    .clone()
                    .unwrap_or_else(|| http_addr.to_string()),
            ),
            (
                "grpc".to_owned(),
                config
                    .advertise_grpc
                    .clone()
                    .unwrap_or_else(|| grpc_addr.to_string()),
            ),
        ]),
        ..Instance::default()
    };
    let registration = keeper
        .register("center", instance)
        .await
        .map_err(keeper_error)?;
    let tuning = keeper
        .config_or_default_with::<CenterTuning>("center", CenterTuning::validate)
        .await
        .map_err(keeper_error)?;
    // Version 0: nothing pushed yet, the file's (or flags') values stand.
    let config = match tuning.version() {
        0 => config,
        _ => config.with_tuning(&tuning.current()),
    };
    tracing::info!(id = %config.id, http = %http_addr, grpc = %grpc_addr, "center serving");
    let center = Center::new(config, inputs, shutdown.clone());
    tokio::spawn(follow_tuning(tuning, center.clone(), shutdown.clone()));
    let served = serve(center, listeners, telemetry::prometheus(), shutdown).await;
    if let Err(e) = registration.shutdown().await {
        tracing::warn!("deregistering: {e}");
    }
    served
}

/// Serves the HTTP and gRPC APIs of `center` on `listeners` until `shutdown`, then waits for
/// in-flight requests and background work.
pub async fn serve(
    center: Arc<Center>,
    listeners: Listeners,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: CancellationToken,
) -> Result<()> {
    if let Some(handle) = metrics.clone() {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            // Histograms are only drained by upkeep; without it their memory grows.
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => handle.run_upkeep(),
                }
            }
        });
    }
    let Listeners {
        http: http_listener,
        grpc: grpc_listener,
    } = listeners;
    let router = crate::http::router(center.clone(), metrics);
    let http_stop = shutdown.clone();
    let http = async move {
        axum::serve(http_listener, router)
            .with_graceful_shutdown(http_stop.cancelled_owned())
            .await
            .map_err(|e| Error::Internal(format!("http server: {e}")))
    };
    let grpc_service = Grpc::new(center.clone());
    let grpc_stop = shutdown.clone();
    let grpc = async move {
        tonic::transport::Server::builder()
            .add_service(grpc_service.center_service())
            .add_service(grpc_service.coordinator_service())
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
                grpc_stop.cancelled(),
            )
            .await
            .map_err(|e| Error::Internal(format!("grpc server: {e}")))
    };
    let result = tokio::try_join!(http, grpc).map(|_| ());
    // A server that failed stops the other one too.
    shutdown.cancel();
    center.wait().await;
    result
}

/// Applies every new version of the typed config `center` (only versions that passed
/// [`CenterTuning::validate`] arrive; the SDK reports the others under `/applied`).
async fn follow_tuning(
    handle: keeper_sdk::ConfigHandle<CenterTuning>,
    center: Arc<Center>,
    stop: CancellationToken,
) {
    handle
        .for_each(stop, |tuning, version| {
            let later = center.apply_tuning(&tuning);
            tracing::info!(version, "center config applied");
            if !later.is_empty() {
                let later = later.join(", ");
                tracing::warn!(
                    version,
                    "changed fields that apply after a restart: {later}"
                );
            }
        })
        .await;
}

/// Follows `apps`, discovery of `room` and `register`, and the slot map, each into a watch.
pub async fn keeper_inputs(keeper: &Keeper, shutdown: &CancellationToken) -> Result<Inputs> {
    let apps_handle = keeper
        .config_or_default_with::<AppsConfig>("apps", |a| a.validate().map_err(|e| e.to_string()))
        .await
        .map_err(keeper_error)?;
    let (apps_tx, apps) = watch::channel(apps_handle.current());
    // Only documents that passed `validate` arrive; the SDK reports the others.
    tokio::spawn(apps_handle.for_each(shutdown.clone(), move |apps, _| {
        apps_tx.send_replace(apps);
    }));

    let room_discovery = keeper.discover("room").await.map_err(keeper_error)?;
    let to_rooms = |list: &[InstanceInfo]| {
        rooms::sorted(
            list.iter()
                .map(|i| Room::from_addrs(&i.id, &i.addrs))
                .collect(),
        )
    };
    let (rooms_tx, rooms) = watch::channel(Arc::new(to_rooms(&room_discovery.instances())));
    follow(room_discovery, shutdown.clone(), move |list| {
        rooms_tx.send_replace(Arc::new(to_rooms(list)));
    });

    let register_discovery = keeper.discover("register").await.map_err(keeper_error)?;
    let to_registers = |list: &[InstanceInfo]| -> BTreeMap<String, String> {
        list.iter()
            .filter_map(|i| {
                let addr = i.addrs.get("grpc").or_else(|| i.addrs.values().next())?;
                Some((i.id.clone(), addr.clone()))
            })
            .collect()
    };
    let (registers_tx, registers) =
        watch::channel(Arc::new(to_registers(&register_discovery.instances())));
    follow(register_discovery, shutdown.clone(), move |list| {
        registers_tx.send_replace(Arc::new(to_registers(list)));
    });

    let (slots_tx, slots) = watch::channel(Arc::new(SlotMap::empty()));
    tokio::spawn(follow_slots(keeper.clone(), slots_tx, shutdown.clone()));

    Ok(Inputs {
        apps,
        rooms,
        registers,
        slots,
    })
}

fn follow(
    mut discovery: keeper_sdk::Discovery,
    stop: CancellationToken,
    mut apply: impl FnMut(&[InstanceInfo]) + Send + 'static,
) {
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                next = discovery.changed() => next,
            };
            match next {
                Ok(list) => apply(&list),
                Err(e) => {
                    tracing::warn!("discovery stream ended: {e}");
                    return;
                }
            }
        }
    });
}

/// Keeps `tx` equal to `/register/slots`: read it, watch it from the next revision, and start
/// over after any error (a compacted history included).
async fn follow_slots(keeper: Keeper, tx: watch::Sender<Arc<SlotMap>>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            result = slots_round(&keeper, &tx) => {
                if let Err(e) = result {
                    tracing::warn!("following {SLOTS_KEY}: {e}; starting over");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// One read-then-watch of the slot map; returns only on an error.
async fn slots_round(
    keeper: &Keeper,
    tx: &watch::Sender<Arc<SlotMap>>,
) -> std::result::Result<(), keeper_sdk::Error> {
    let apply = |value: &[u8]| match serde_json::from_slice::<SlotMap>(value) {
        Ok(map) if map.check().is_ok() => {
            // Never step back to an older map (a slow watch after a fresh read).
            if map.epoch >= tx.borrow().epoch {
                tx.send_replace(Arc::new(map));
            }
        }
        Ok(map) => tracing::warn!("ignoring slot map with {} slots", map.slots.len()),
        Err(e) => tracing::warn!("ignoring unreadable slot map: {e}"),
    };
    let (kvs, revision) = keeper.get_prefix(SLOTS_KEY).await?;
    if let Some(kv) = kvs.iter().find(|kv| kv.key == SLOTS_KEY) {
        apply(&kv.value);
    }
    let mut events = keeper.watch_prefix(SLOTS_KEY, revision + 1).await?;
    loop {
        for event in events.next().await? {
            if event.kv.key == SLOTS_KEY && event.kind == keeper_sdk::EventKind::Put {
                apply(&event.kv.value);
            }
        }
    }
}
