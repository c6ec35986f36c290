//! `keeperctl config push|get|history|rollback|promote`: typed config rollouts, gray releases
//! (canaries) and waiting until instances report what they applied.
//!
//! Every write is ONE txn guarded by the mod_revision of what was read (`/config/{service}` and
//! `/config-canary/{service}`), so two operators can never both push version N+1: the second sees
//! a conflict, and nothing of its push is written.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use anyhow::anyhow;
use anyhow::bail;
use indicatif::ProgressBar;
use indicatif::ProgressDrawTarget;
use indicatif::ProgressStyle;
use keeper_sdk::layout;
use keeper_sdk::layout::AppliedReport;
use keeper_sdk::layout::Canary;
use keeper_sdk::layout::ConfigDocument;
use keeper_sdk::layout::InstanceInfo;
use serde_json::json;

use crate::cli::ConfigCommand;
use crate::cli::PushArgs;
use crate::client::Client;
use crate::client::delete_op;
use crate::client::mod_revision_is;
use crate::client::put_op;
use crate::diff;
use crate::output::Out;
use crate::schema;

/// How often `--wait` re-reads instances and their reports.
const WAIT_POLL: Duration = Duration::from_millis(100);

/// A document as read, with the mod_revision the next write must compare against (0 = absent).
struct Read<T> {
    doc: Option<T>,
    mod_revision: i64,
}

async fn read_config(client: &Client, service: &str) -> anyhow::Result<Read<ConfigDocument>> {
    match client.get(&layout::config_key(service)).await? {
        Some(kv) => Ok(Read {
            doc: Some(kv.json()?),
            mod_revision: kv.mod_revision,
        }),
        None => Ok(Read {
            doc: None,
            mod_revision: 0,
        }),
    }
}

async fn read_canary(client: &Client, service: &str) -> anyhow::Result<Read<Canary>> {
    match client.get(&layout::config_canary_key(service)).await? {
        Some(kv) => Ok(Read {
            doc: Some(kv.json()?),
            mod_revision: kv.mod_revision,
        }),
        None => Ok(Read {
            doc: None,
            mod_revision: 0,
        }),
    }
}

fn check_service(service: &str) -> anyhow::Result<()> {
    layout::check_name("service", service).map_err(|e| anyhow!(e))
}

pub async fn run(
    client: &Client,
    out: Out,
    cmd: ConfigCommand,
    wait_timeout: Duration,
) -> anyhow::Result<()> {
    match cmd {
        ConfigCommand::Push(args) => push(client, out, args, wait_timeout).await,
        ConfigCommand::Get { service, version } => get(client, out, &service, version).await,
        ConfigCommand::History { service } => history(client, out, &service).await,
        ConfigCommand::Rollback { service, version } => {
            rollback(client, out, &service, version).await
        }
        ConfigCommand::Promote { service } => promote(client, out, &service).await,
    }
}

fn describe(doc: &ConfigDocument) -> String {
    format!(
        "version {} ({} by {})",
        doc.version, doc.updated_at, doc.author
    )
}

/// Reads FILE, validates it against `/schema/{service}`, returns its document body and format.
async fn load_and_validate(
    client: &Client,
    service: &str,
    file: &Path,
    no_schema: bool,
) -> anyhow::Result<(String, layout::Format)> {
    let format = schema::format_of(file)?;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let parsed = schema::parse(&text, format)
        .map_err(|e| anyhow!("{}: {e}; nothing pushed", file.display()))?;
    match client.get(&layout::schema_key(service)).await? {
        Some(kv) => {
            let schema: serde_json::Value = kv.json()?;
            let errors = schema::validate(&schema, &parsed)?;
            if !errors.is_empty() {
                let list: Vec<String> = errors
                    .iter()
                    .map(|e| format!("line {}: {}", e.line, e.message))
                    .collect();
                bail!(
                    "{} does not match the schema of {service}; nothing pushed: {}",
                    file.display(),
                    list.join("; ")
                );
            }
        }
        None if no_schema => {
            eprintln!(
                "warning: {service} has published no schema at {}: pushing unvalidated",
                layout::schema_key(service)
            );
        }
        None => bail!(
            "{service} has published no schema at {} (a process publishes it when it calls \
             config::<T>(\"{service}\")); nothing pushed: pass --no-schema to push unvalidated",
            layout::schema_key(service)
        ),
    }
    Ok((text, format))
}

/// Explains what changed under us after a txn's compares failed.
async fn conflict(client: &Client, service: &str, read_version: Option<u64>) -> anyhow::Error {
    let now = match read_config(client, service).await {
        Ok(Read { doc: Some(d), .. }) => describe(&d),
        Ok(Read { doc: None, .. }) => "no document".to_string(),
        Err(e) => format!("unreadable: {e}"),
    };
    let canary = match read_canary(client, service).await {
        Ok(Read { doc: Some(c), .. }) => format!(", canary version {} pending", c.doc.version),
        _ => String::new(),
    };
    let was = read_version.map_or("none".to_string(), |v| format!("version {v}"));
    anyhow!(
        "conflict: the config of {service} changed while this command ran (read {was}, now \
         {now}{canary}); nothing written: run it again"
    )
}

async fn push(
    client: &Client,
    out: Out,
    args: PushArgs,
    wait_timeout: Duration,
) -> anyhow::Result<()> {
    let service = args.service.as_str();
    check_service(service)?;
    for id in &args.canary {
        layout::check_name("canary instance", id).map_err(|e| anyhow!(e))?;
    }
    let (body, format) = load_and_validate(client, service, &args.file, args.no_schema).await?;
    let current = read_config(client, service).await?;
    let canary_read = read_canary(client, service).await?;
    let is_canary = !args.canary.is_empty() || args.canary_percent.is_some();
    if let (false, Some(c)) = (is_canary, &canary_read.doc) {
        bail!(
            "a canary (version {}) of {service} is in progress: `keeperctl config promote {service}` \
             or `keeperctl config rollback {service}` first; nothing pushed",
            c.doc.version
        );
    }
    let current_version = current.doc.as_ref().map_or(0, |d| d.version);
    let version = current_version + 1;
    let old_body = current.doc.as_ref().map_or("", |d| d.body.as_str());
    let old_label = current
        .doc
        .as_ref()
        .map_or("(no config yet)".to_string(), |d| {
            format!("{service} version {}", d.version)
        });
    let file_label = args.file.display().to_string();
    let diff = diff::unified(
        old_body,
        &body,
        &old_label,
        &file_label,
        out.color && !out.json,
    );
    if !out.json {
        if diff.is_empty() {
            println!("no change against {old_label}");
        } else {
            print!("{diff}");
        }
    }
    if !is_canary
        && current
            .doc
            .as_ref()
            .is_some_and(|d| d.body == body && d.format == format)
    {
        if out.json {
            out.json(&json!({"service": service, "version": current_version, "pushed": false, "reason": "unchanged"}))?;
        }
        return Ok(());
    }
    if args.dry_run {
        if out.json {
            out.json(&json!({"service": service, "version": version, "pushed": false, "dry_run": true, "diff": diff::unified(old_body, &body, &old_label, &file_label, false)}))?;
        } else {
            println!("dry run: {service} would get version {version}; nothing pushed");
        }
        return Ok(());
    }
    let doc = ConfigDocument {
        version,
        format,
        body,
        updated_at: layout::now_rfc3339(),
        author: crate::output::author(),
    };
    let canary = is_canary.then(|| Canary {
        doc: doc.clone(),
        instances: args.canary.clone(),
        percent: args.canary_percent,
    });
    let mut compares = vec![
        mod_revision_is(&layout::config_key(service), current.mod_revision),
        mod_revision_is(
            &layout::config_canary_key(service),
            canary_read.mod_revision,
        ),
    ];
    let ops = match &canary {
        Some(c) => vec![put_op(
            &layout::config_canary_key(service),
            serde_json::to_vec(c)?,
        )],
        None => {
            let value = serde_json::to_vec(&doc)?;
            // History must not already hold this version (a raw write could have put it there).
            compares.push(mod_revision_is(
                &layout::config_history_key(service, version),
                0,
            ));
            vec![
                put_op(&layout::config_key(service), value.clone()),
                put_op(&layout::config_history_key(service, version), value),
            ]
        }
    };
    let outcome = client.txn(compares, ops).await?;
    if !outcome.succeeded {
        return Err(conflict(client, service, current.doc.map(|d| d.version)).await);
    }
    if !out.json {
        match &canary {
            Some(c) => println!(
                "pushed {service} version {version} as a canary to {}",
                canary_targets(c)
            ),
            None => println!("pushed {service} version {version}"),
        }
    }
    let waited = if args.wait {
        Some(wait_applied(client, out, service, version, canary.as_ref(), wait_timeout).await?)
    } else {
        None
    };
    if out.json {
        out.json(&json!({
            "service": service,
            "version": version,
            "pushed": true,
            "revision": outcome.revision,
            "canary": canary,
            "applied_by": waited,
        }))?;
    }
    Ok(())
}

fn canary_targets(c: &Canary) -> String {
    let mut parts = Vec::new();
    if !c.instances.is_empty() {
        parts.push(c.instances.join(","));
    }
    if let Some(p) = c.percent {
        parts.push(format!("{p}% of instances"));
    }
    parts.join(" and ")
}

/// Waits until every live instance that should apply `version` (every instance, or the canary's)
/// reports it applied. Fails at the first instance reporting an error for it, or at the timeout
/// naming who has not applied. Returns the instances that applied.
pub async fn wait_applied(
    client: &Client,
    out: Out,
    service: &str,
    version: u64,
    canary: Option<&Canary>,
    timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + timeout;
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    if out.json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} instances applied {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(format!("version {version}"));
    loop {
        let (instance_kvs, _) = client
            .get_prefix(&layout::instances_prefix(service))
            .await?;
        let (applied_kvs, _) = client.get_prefix(&layout::applied_prefix(service)).await?;
        let reports: BTreeMap<String, AppliedReport> = applied_kvs
            .iter()
            .filter_map(|kv| {
                let id = kv.key.strip_prefix(&layout::applied_prefix(service))?;
                Some((id.to_string(), kv.json().ok()?))
            })
            .collect();
        let targets: Vec<String> = instance_kvs
            .iter()
            .filter_map(|kv| {
                let info: InstanceInfo = kv.json().ok()?;
                Some(info.id)
            })
            .filter(|id| canary.is_none_or(|c| c.includes(id)))
            .collect();
        let mut done = Vec::new();
        let mut failed = Vec::new();
        let mut pending = Vec::new();
        for id in &targets {
            match reports.get(id) {
                Some(r) if r.version == version && !r.ok => failed.push(format!(
                    "{id}: {}",
                    r.error.as_deref().unwrap_or("(no error message)")
                )),
                Some(r) if r.version >= version && r.ok => done.push(id.clone()),
                Some(r) => pending.push(format!("{id} (at version {})", r.version)),
                None => pending.push(format!("{id} (no report)")),
            }
        }
        bar.set_length(targets.len() as u64);
        bar.set_position(done.len() as u64);
        if !failed.is_empty() {
            bar.abandon();
            bail!(
                "{} instance(s) of {service} rejected version {version}: {}",
                failed.len(),
                failed.join("; ")
            );
        }
        if pending.is_empty() {
            bar.finish_and_clear();
            if !out.json {
                if targets.is_empty() {
                    println!("no live instance of {service} to wait for");
                } else {
                    println!(
                        "{} instance(s) of {service} applied version {version}",
                        done.len()
                    );
                }
            }
            return Ok(done);
        }
        if Instant::now() >= deadline {
            bar.abandon();
            bail!(
                "timed out after {:.1} s waiting for {service} version {version}: not applied by {}",
                timeout.as_secs_f64(),
                pending.join(", ")
            );
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

async fn get(client: &Client, out: Out, service: &str, version: Option<u64>) -> anyhow::Result<()> {
    check_service(service)?;
    let doc: ConfigDocument = match version {
        Some(v) => client
            .get(&layout::config_history_key(service, v))
            .await?
            .ok_or_else(|| anyhow!("{service} has no version {v} in its history"))?
            .json()?,
        None => read_config(client, service)
            .await?
            .doc
            .ok_or_else(|| anyhow!("{service} has no config (nothing pushed yet)"))?,
    };
    if out.json {
        out.json(&doc)?;
    } else {
        print!("{}", doc.body);
        if !doc.body.ends_with('\n') {
            println!();
        }
    }
    Ok(())
}

async fn history(client: &Client, out: Out, service: &str) -> anyhow::Result<()> {
    check_service(service)?;
    let (kvs, _) = client
        .get_prefix(&layout::config_history_prefix(service))
        .await?;
    let docs: Vec<ConfigDocument> = kvs.iter().map(|kv| kv.json()).collect::<Result<_, _>>()?;
    let canary = read_canary(client, service).await?.doc;
    if out.json {
        return out.json(&json!({"service": service, "versions": docs, "canary": canary}));
    }
    if docs.is_empty() && canary.is_none() {
        bail!("{service} has no config history (nothing pushed yet)");
    }
    let rows = docs
        .iter()
        .map(|d| {
            vec![
                d.version.to_string(),
                d.updated_at.clone(),
                d.author.clone(),
                format!("{:?}", d.format).to_lowercase(),
                format!("{} B", d.body.len()),
            ]
        })
        .collect();
    out.table(&["version", "updated_at", "author", "format", "size"], rows);
    if let Some(c) = canary {
        println!(
            "canary: version {} pushed {} by {} to {} (promote or rollback it)",
            c.doc.version,
            c.doc.updated_at,
            c.doc.author,
            canary_targets(&c)
        );
    }
    Ok(())
}

async fn rollback(
    client: &Client,
    out: Out,
    service: &str,
    version: Option<u64>,
) -> anyhow::Result<()> {
    check_service(service)?;
    let canary = read_canary(client, service).await?;
    let Some(target) = version else {
        let Some(c) = canary.doc else {
            bail!(
                "{service} has no canary to withdraw: give the version to roll back to (see \
                 `keeperctl config history {service}`)"
            );
        };
        let key = layout::config_canary_key(service);
        let outcome = client
            .txn(
                vec![mod_revision_is(&key, canary.mod_revision)],
                vec![delete_op(&key)],
            )
            .await?;
        if !outcome.succeeded {
            return Err(conflict(client, service, None).await);
        }
        if out.json {
            out.json(&json!({"service": service, "withdrawn_canary": c.doc.version}))?;
        } else {
            println!(
                "withdrew the canary (version {}) of {service}: its instances return to the current version",
                c.doc.version
            );
        }
        return Ok(());
    };
    let old: ConfigDocument = client
        .get(&layout::config_history_key(service, target))
        .await?
        .ok_or_else(|| anyhow!("{service} has no version {target} in its history"))?
        .json()?;
    let current = read_config(client, service).await?;
    let version = current.doc.as_ref().map_or(0, |d| d.version) + 1;
    let doc = ConfigDocument {
        version,
        format: old.format,
        body: old.body,
        updated_at: layout::now_rfc3339(),
        author: crate::output::author(),
    };
    let value = serde_json::to_vec(&doc)?;
    let mut ops = vec![
        put_op(&layout::config_key(service), value.clone()),
        put_op(&layout::config_history_key(service, version), value),
    ];
    // Rolling back also withdraws a pending canary: everyone returns to version `target`'s body.
    if canary.doc.is_some() {
        ops.push(delete_op(&layout::config_canary_key(service)));
    }
    let outcome = client
        .txn(
            vec![
                mod_revision_is(&layout::config_key(service), current.mod_revision),
                mod_revision_is(&layout::config_canary_key(service), canary.mod_revision),
                mod_revision_is(&layout::config_history_key(service, version), 0),
            ],
            ops,
        )
        .await?;
    if !outcome.succeeded {
        return Err(conflict(client, service, current.doc.map(|d| d.version)).await);
    }
    if out.json {
        out.json(&json!({"service": service, "version": version, "body_of": target, "withdrawn_canary": canary.doc.map(|c| c.doc.version)}))?;
    } else {
        println!(
            "rolled {service} back to the body of version {target}, pushed as version {version}"
        );
    }
    Ok(())
}

async fn promote(client: &Client, out: Out, service: &str) -> anyhow::Result<()> {
    check_service(service)?;
    let canary = read_canary(client, service).await?;
    let Some(c) = canary.doc else {
        bail!("{service} has no canary to promote");
    };
    let current = read_config(client, service).await?;
    let version = current.doc.as_ref().map_or(0, |d| d.version) + 1;
    let doc = ConfigDocument {
        version,
        format: c.doc.format,
        body: c.doc.body,
        updated_at: layout::now_rfc3339(),
        author: crate::output::author(),
    };
    let value = serde_json::to_vec(&doc)?;
    let outcome = client
        .txn(
            vec![
                mod_revision_is(&layout::config_key(service), current.mod_revision),
                mod_revision_is(&layout::config_canary_key(service), canary.mod_revision),
                mod_revision_is(&layout::config_history_key(service, version), 0),
            ],
            vec![
                put_op(&layout::config_key(service), value.clone()),
                put_op(&layout::config_history_key(service, version), value),
                delete_op(&layout::config_canary_key(service)),
            ],
        )
        .await?;
    if !outcome.succeeded {
        return Err(conflict(client, service, current.doc.map(|d| d.version)).await);
    }
    if out.json {
        out.json(
            &json!({"service": service, "version": version, "promoted_canary": c.doc.version}),
        )?;
    } else {
        println!("promoted the canary of {service} to every instance as version {version}");
    }
    Ok(())
}
