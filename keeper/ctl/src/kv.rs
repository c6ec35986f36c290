//! `keeperctl kv get|put|del|watch`: raw keys.

use anyhow::anyhow;
use anyhow::bail;
use keeper_sdk::EventKind;
use serde_json::json;

use crate::cli::KvCommand;
use crate::client::Client;
use crate::client::Kv;
use crate::output::Out;

fn kv_json(kv: &Kv) -> serde_json::Value {
    json!({
        "key": kv.key,
        "value": String::from_utf8_lossy(&kv.value),
        "create_revision": kv.create_revision,
        "mod_revision": kv.mod_revision,
        "version": kv.version,
        "lease": kv.lease,
    })
}

pub async fn run(client: &Client, out: Out, cmd: KvCommand) -> anyhow::Result<()> {
    match cmd {
        KvCommand::Get { key, prefix: false } => {
            let kv = client
                .get(&key)
                .await?
                .ok_or_else(|| anyhow!("key not found: {key}"))?;
            if out.json {
                out.json(&kv_json(&kv))?;
            } else {
                println!("{}", String::from_utf8_lossy(&kv.value));
            }
        }
        KvCommand::Get { key, prefix: true } => {
            let (kvs, revision) = client.get_prefix(&key).await?;
            if out.json {
                let kvs: Vec<_> = kvs.iter().map(kv_json).collect();
                out.json(&json!({ "revision": revision, "kvs": kvs }))?;
            } else {
                let rows = kvs
                    .iter()
                    .map(|kv| {
                        vec![
                            kv.key.clone(),
                            String::from_utf8_lossy(&kv.value).into_owned(),
                            kv.mod_revision.to_string(),
                            if kv.lease == 0 {
                                "-".into()
                            } else {
                                format!("{:x}", kv.lease)
                            },
                        ]
                    })
                    .collect();
                out.table(&["key", "value", "mod revision", "lease"], rows);
            }
        }
        KvCommand::Put { key, value } => {
            let revision = client.put(&key, value.into_bytes()).await?;
            if out.json {
                out.json(&json!({ "key": key, "revision": revision }))?;
            } else {
                println!("OK (revision {revision})");
            }
        }
        KvCommand::Del { key, prefix } => {
            let deleted = client.delete(&key, prefix).await?;
            if out.json {
                out.json(&json!({ "deleted": deleted }))?;
            } else {
                println!("deleted {deleted}");
            }
        }
        KvCommand::Watch { key, prefix, rev } => watch(client, out, &key, prefix, rev).await?,
    }
    Ok(())
}

/// Prints every event until Ctrl-C (exit 0). The SDK's watch resumes from the last revision seen
/// after a disconnect, on any endpoint, so a keeper failover loses no event.
async fn watch(
    client: &Client,
    out: Out,
    key: &str,
    prefix: bool,
    rev: Option<i64>,
) -> anyhow::Result<()> {
    // An exact-key watch is a prefix watch filtered to that key.
    let mut events = client.keeper().watch_prefix(key, rev.unwrap_or(0)).await?;
    loop {
        let batch = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            b = events.next() => b,
        };
        let batch = match batch {
            Ok(b) => b,
            Err(keeper_sdk::Error::Compacted { compact_revision }) => bail!(
                "revision {} is compacted: the oldest retained revision is {compact_revision}",
                rev.unwrap_or(0)
            ),
            Err(e) => bail!("watch on {key}: {e}"),
        };
        for event in batch {
            let kv = event.kv;
            if !prefix && kv.key != key {
                continue;
            }
            let kind = match event.kind {
                EventKind::Delete => "DELETE",
                EventKind::Put => "PUT",
            };
            if out.json {
                let mut v = kv_json(&kv);
                v["type"] = json!(kind);
                v["revision"] = json!(event.revision);
                println!("{}", serde_json::to_string(&v)?);
            } else if kind == "DELETE" {
                println!("DELETE {} (revision {})", kv.key, event.revision);
            } else {
                println!(
                    "PUT {} = {} (revision {})",
                    kv.key,
                    String::from_utf8_lossy(&kv.value),
                    event.revision
                );
            }
        }
    }
}
