//! `keeperctl command SERVICE INSTANCE VERB`: queue a control command for one instance and,
//! with `--wait`, print its acknowledgement.

use std::time::Duration;
use std::time::Instant;

use anyhow::anyhow;
use anyhow::bail;
use keeper_sdk::layout;
use keeper_sdk::layout::CommandAck;
use keeper_sdk::layout::CommandDoc;
use serde_json::json;

use crate::cli::CommandArgs;
use crate::client::Client;
use crate::client::mod_revision_is;
use crate::client::put_op;
use crate::output::Out;

/// How many times a seq is re-picked when another keeperctl took it first.
const MAX_SEQ_RETRIES: u32 = 20;
/// How often `--wait` looks for the acknowledgement.
const ACK_POLL: Duration = Duration::from_millis(100);

/// The highest seq used under `prefix`, or 0.
async fn last_seq(client: &Client, prefix: &str) -> anyhow::Result<u64> {
    Ok(client
        .last_under(prefix)
        .await?
        .and_then(|kv| layout::parse_seq_suffix(&kv.key))
        .unwrap_or(0))
}

pub async fn run(
    client: &Client,
    out: Out,
    args: CommandArgs,
    wait_timeout: Duration,
) -> anyhow::Result<()> {
    let (service, instance) = (args.service.as_str(), args.instance.as_str());
    layout::check_name("service", service).map_err(|e| anyhow!(e))?;
    layout::check_name("instance", instance).map_err(|e| anyhow!(e))?;
    if args.verb.is_empty() {
        bail!("the verb must not be empty");
    }
    if client
        .get(&layout::instance_key(service, instance))
        .await?
        .is_none()
    {
        eprintln!(
            "warning: {service}/{instance} is not registered now; it gets the command when it registers"
        );
    }
    let arg_map: serde_json::Map<String, serde_json::Value> = args
        .args
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    // Acks outlive commands an instance may clean up: never reuse a seq either has used.
    let mut seq = last_seq(client, &layout::commands_prefix(service, instance))
        .await?
        .max(last_seq(client, &layout::command_acks_prefix(service, instance)).await?)
        + 1;
    let mut attempts = 0;
    loop {
        let doc = CommandDoc {
            seq,
            verb: args.verb.clone(),
            args: serde_json::Value::Object(arg_map.clone()),
            issued_at: layout::now_rfc3339(),
        };
        let key = layout::command_key(service, instance, seq);
        let outcome = client
            .txn(
                vec![mod_revision_is(&key, 0)],
                vec![put_op(&key, serde_json::to_vec(&doc)?)],
            )
            .await?;
        if outcome.succeeded {
            break;
        }
        attempts += 1;
        if attempts >= MAX_SEQ_RETRIES {
            bail!(
                "could not allocate a command seq for {service}/{instance} after {attempts} conflicts"
            );
        }
        seq += 1;
    }
    if !out.json {
        println!(
            "sent {} to {service}/{instance} as command {seq}",
            args.verb
        );
    }
    if !args.wait {
        if out.json {
            out.json(
                &json!({"service": service, "instance": instance, "seq": seq, "verb": args.verb}),
            )?;
        }
        return Ok(());
    }
    let deadline = Instant::now() + wait_timeout;
    let ack_key = layout::command_ack_key(service, instance, seq);
    let ack: CommandAck = loop {
        if let Some(kv) = client.get(&ack_key).await? {
            break kv.json()?;
        }
        if Instant::now() >= deadline {
            bail!(
                "no acknowledgement of command {seq} ({}) from {service}/{instance} within {:.1} s",
                args.verb,
                wait_timeout.as_secs_f64()
            );
        }
        tokio::time::sleep(ACK_POLL).await;
    };
    if out.json {
        out.json(&json!({"service": service, "instance": instance, "seq": seq, "verb": args.verb, "ack": ack}))?;
    } else {
        println!(
            "{service}/{instance} acknowledged command {seq}: {} {}",
            if ack.ok { "ok" } else { "FAILED" },
            ack.message
        );
    }
    if !ack.ok {
        bail!(
            "{service}/{instance} refused command {seq} ({}): {}",
            args.verb,
            ack.message
        );
    }
    Ok(())
}
