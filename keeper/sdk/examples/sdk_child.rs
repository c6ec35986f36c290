//! A child process for tests and benchmarks: registers instances and/or subscribes to a
//! config, then runs until killed. Lets a test kill -9 an SDK user (its lease is then only
//! ended by TTL) and spread config subscribers over processes.
//!
//! `sdk_child --endpoints A,B,C [--register SERVICE:ID[,ID...]] [--config SERVICE --instances N]
//!            [--ttl S]`; prints `ready` on stdout once everything is in place.

use std::time::Duration;

use anyhow::Context;

#[derive(serde::Deserialize, schemars::JsonSchema, Debug)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Bench {
    /// Anything; subscribers only report which version they applied.
    #[serde(default)]
    value: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let endpoints: Vec<String> = arg("--endpoints")
        .context("--endpoints is required")?
        .split(',')
        .map(str::to_string)
        .collect();
    let ttl: i64 = arg("--ttl").map(|t| t.parse()).transpose()?.unwrap_or(10);
    let prefix =
        arg("--instance-prefix").unwrap_or_else(|| format!("child-{}", std::process::id()));

    let mut keepers = Vec::new();
    let mut registrations = Vec::new();
    if let Some(spec) = arg("--register") {
        let (service, ids) = spec.split_once(':').context("--register SERVICE:ID[,ID]")?;
        let mut opts = keeper_sdk::ConnectOptions::new(&endpoints);
        opts.lease_ttl_s = ttl;
        opts.request_timeout = Duration::from_secs(30);
        let keeper = keeper_sdk::Keeper::connect_with(opts).await?;
        for id in ids.split(',') {
            let instance = keeper_sdk::Instance {
                id: id.to_string(),
                ..Default::default()
            };
            registrations.push(keeper.register(service, instance).await?);
        }
        keepers.push(keeper);
    }
    let mut handles = Vec::new();
    if let Some(service) = arg("--config") {
        let n: usize = arg("--instances")
            .map(|n| n.parse())
            .transpose()?
            .unwrap_or(1);
        for i in 0..n {
            // One Keeper per subscriber: each has its own instance id and session lease, as
            // separate service processes would.
            let mut opts = keeper_sdk::ConnectOptions::new(&endpoints);
            opts.instance = Some(format!("{prefix}-{i}"));
            opts.lease_ttl_s = ttl;
            let keeper = keeper_sdk::Keeper::connect_with(opts).await?;
            handles.push(keeper.config::<Bench>(&service).await?);
            keepers.push(keeper);
        }
    }
    println!("ready");
    std::future::pending::<()>().await;
    drop((registrations, handles));
    Ok(())
}
