//! `keeperctl services [SERVICE]`: who is registered, where, since when, and which config version
//! each instance applied (or why it did not).

use std::collections::BTreeMap;

use anyhow::anyhow;
use keeper_sdk::layout;
use keeper_sdk::layout::AppliedReport;
use keeper_sdk::layout::Canary;
use keeper_sdk::layout::ConfigDocument;
use keeper_sdk::layout::InstanceInfo;
use serde_json::json;

use crate::client::Client;
use crate::output::Out;
use crate::output::age;
use crate::output::seconds_since;

/// `/{kind}/{service}/{rest}` -> (service, rest).
fn split_key<'a>(key: &'a str, kind: &str) -> Option<(&'a str, &'a str)> {
    key.strip_prefix(kind)?.strip_prefix('/')?.split_once('/')
}

/// Current documents under a `/{kind}/` prefix, by service.
async fn by_service<T: serde::de::DeserializeOwned>(
    client: &Client,
    kind: &str,
) -> anyhow::Result<BTreeMap<String, T>> {
    let prefix = format!("/{kind}/");
    let (kvs, _) = client.get_prefix(&prefix).await?;
    Ok(kvs
        .iter()
        .filter_map(|kv| {
            let service = kv.key.strip_prefix(&prefix)?;
            Some((service.to_string(), kv.json().ok()?))
        })
        .collect())
}

pub async fn run(client: &Client, out: Out, service: Option<String>) -> anyhow::Result<()> {
    if let Some(s) = &service {
        layout::check_name("service", s).map_err(|e| anyhow!(e))?;
    }
    let scope = |kind: &str| match &service {
        Some(s) => format!("/{kind}/{s}/"),
        None => format!("/{kind}/"),
    };
    let (instance_kvs, _) = client.get_prefix(&scope("instances")).await?;
    let (applied_kvs, _) = client.get_prefix(&scope("applied")).await?;
    let configs: BTreeMap<String, ConfigDocument> = by_service(client, "config").await?;
    let canaries: BTreeMap<String, Canary> = by_service(client, "config-canary").await?;
    let reports: BTreeMap<(String, String), AppliedReport> = applied_kvs
        .iter()
        .filter_map(|kv| {
            let (svc, id) = split_key(&kv.key, "/applied")?;
            Some(((svc.to_string(), id.to_string()), kv.json().ok()?))
        })
        .collect();
    let mut rows = Vec::new();
    let mut docs = Vec::new();
    for kv in &instance_kvs {
        let Some((svc, _)) = split_key(&kv.key, "/instances") else {
            continue;
        };
        let info: InstanceInfo = match kv.json() {
            Ok(i) => i,
            Err(e) => {
                eprintln!("warning: {e}");
                continue;
            }
        };
        let report = reports.get(&(svc.to_string(), info.id.clone()));
        let current = configs.get(svc).map(|d| d.version);
        let canary = canaries
            .get(svc)
            .filter(|c| c.includes(&info.id))
            .map(|c| c.doc.version);
        let age_s = seconds_since(&info.started_at);
        let status = match report {
            None => "-".to_string(),
            Some(r) if r.ok => "ok".to_string(),
            Some(r) => format!("error: {}", r.error.as_deref().unwrap_or("(no message)")),
        };
        let mut config = report.map_or("-".to_string(), |r| r.version.to_string());
        if let Some(v) = canary {
            config.push_str(&format!(" (canary {v})"));
        } else if let (Some(r), Some(c)) = (report, current)
            && r.version != c
        {
            config.push_str(&format!(" (current {c})"));
        }
        rows.push(vec![
            svc.to_string(),
            info.id.clone(),
            info.addrs
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" "),
            info.zone.clone(),
            age_s.map_or("?".into(), age),
            config,
            status,
        ]);
        docs.push(json!({
            "service": svc,
            "id": info.id,
            "addrs": info.addrs,
            "zone": info.zone,
            "started_at": info.started_at,
            "age_s": age_s,
            "meta": info.meta,
            "applied": report,
            "current_version": current,
            "canary_version": canary,
        }));
    }
    if out.json {
        out.json(&docs)?;
    } else {
        out.table(
            &[
                "service",
                "id",
                "addresses",
                "zone",
                "age",
                "config",
                "status",
            ],
            rows,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_service_and_id() {
        assert_eq!(
            split_key("/instances/room/r-1", "/instances"),
            Some(("room", "r-1"))
        );
        assert_eq!(split_key("/instancesX/room/r", "/instances"), None);
        assert_eq!(split_key("/applied/room", "/applied"), None);
    }
}
