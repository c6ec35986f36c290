//! A center without a keeper, for API fuzzing (center/scripts/schemathesis.sh): apps `demo`
//! (key `k-demo`) and `other` (key `k-other`), no rooms, no registers.
//!
//! cargo run -p center --example standalone -- 127.0.0.1:18080 127.0.0.1:18081

use std::collections::BTreeMap;
use std::sync::Arc;

use center::CenterConfig;
use center::Inputs;
use longlink_common::App;
use longlink_common::AppsConfig;
use longlink_common::SlotMap;
use longlink_common::apps::RateLimit;
use tokio::sync::watch;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let config = CenterConfig {
        http: args
            .next()
            .as_deref()
            .unwrap_or("127.0.0.1:18080")
            .parse()?,
        grpc: args
            .next()
            .as_deref()
            .unwrap_or("127.0.0.1:18081")
            .parse()?,
        ..CenterConfig::default()
    };
    let app = |id: &str, key: &str| App {
        id: id.into(),
        secret: format!("{id}-secret"),
        api_keys: vec![key.into()],
        webhook_url: None,
        rate_limit: RateLimit {
            per_second: 100_000,
            burst: 100_000,
        },
    };
    let apps = AppsConfig {
        apps: vec![app("demo", "k-demo"), app("other", "k-other")],
    };
    let (_apps_tx, apps) = watch::channel(Arc::new(apps));
    let (_rooms_tx, rooms) = center::rooms::channel(vec![]);
    let (_registers_tx, registers) = watch::channel(Arc::new(BTreeMap::new()));
    let (_slots_tx, slots) = watch::channel(Arc::new(SlotMap::empty()));
    let shutdown = telemetry::shutdown_on_signal();
    let listeners = center::server::Listeners::bind(&config).await?;
    let center = center::Center::new(
        config,
        Inputs {
            apps,
            rooms,
            registers,
            slots,
        },
        shutdown.clone(),
    );
    eprintln!("standalone center ready");
    center::serve(center, listeners, center::prometheus::install(), shutdown).await?;
    Ok(())
}
