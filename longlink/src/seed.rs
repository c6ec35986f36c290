//! First-start seeding of `longlink dev`: a demo app with a fresh secret and API key, pushed as
//! version 1 of the typed config `apps`, so the quickstart works without any setup.

use anyhow::Context;
use keeper_sdk::Keeper;
use keeper_sdk::layout;
use longlink_common::App;
use longlink_common::AppsConfig;
use longlink_common::apps::RateLimit;

/// The app `longlink dev` creates.
pub const DEMO_APP: &str = "demo";

/// Reads the `apps` config currently in the keeper, if any was pushed.
pub async fn current_apps(keeper: &Keeper) -> anyhow::Result<Option<AppsConfig>> {
    let Some(kv) = keeper.get(&layout::config_key("apps")).await? else {
        return Ok(None);
    };
    let doc: layout::ConfigDocument = kv.json().context("reading /config/apps")?;
    let apps = keeper_sdk::parse_document::<AppsConfig>(&doc)
        .map_err(|e| anyhow::anyhow!("the apps config (version {}): {e}", doc.version))?;
    Ok(Some(apps))
}

/// The app `id` from the keeper's `apps` config, with a clear error when it is not there.
pub async fn app(keeper: &Keeper, id: &str) -> anyhow::Result<App> {
    let apps = current_apps(keeper)
        .await?
        .context("no apps config in the keeper: is `longlink dev` running?")?;
    apps.get(id)
        .cloned()
        .with_context(|| format!("no app {id:?} in the apps config"))
}

/// Pushes version 1 of `apps` with the demo app unless an `apps` config exists (a restart keeps
/// the existing secret and key). Returns the demo app as it is in the keeper.
pub async fn seed_demo(keeper: &Keeper) -> anyhow::Result<App> {
    if current_apps(keeper).await?.is_none() {
        let apps = AppsConfig {
            apps: vec![App {
                id: DEMO_APP.into(),
                secret: random_hex(32),
                api_keys: vec![format!("demo-{}", random_hex(16))],
                webhook_url: None,
                rate_limit: RateLimit::default(),
            }],
        };
        let doc = layout::ConfigDocument {
            version: 1,
            format: layout::Format::Toml,
            body: toml::to_string_pretty(&apps)?,
            updated_at: layout::now_rfc3339(),
            author: "longlink dev (first start)".into(),
        };
        let value = serde_json::to_vec(&doc)?;
        // Create-if-absent: two racing starts cannot both seed.
        if keeper
            .cas(&layout::config_key("apps"), 0, value.clone())
            .await?
        {
            keeper
                .put(&layout::config_history_key("apps", 1), value)
                .await?;
        }
    }
    app(keeper, DEMO_APP).await
}

fn random_hex(bytes: usize) -> String {
    let raw: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    hex::encode(raw)
}
