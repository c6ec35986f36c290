//! Typed config: [`ConfigHandle`] holds the service's current config as an `Arc<T>` and follows
//! `/config/{service}` (and a gray release under `/config-canary/{service}`) by watch.
//!
//! Watch events are triggers: on an event at revision R the task reads both keys *at* R and
//! applies the effective document ([`layout::effective_document`]). Reading both at one revision
//! makes a promote (config put + canary delete in one txn) a single step, never a flap back to
//! the old version. Every document tried is reported under `/applied/{service}/{instance}`.

use std::sync::Arc;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::sync::DropGuard;

use crate::client::Keeper;
use crate::client::KeyValue;
use crate::error::Error;
use crate::error::Result;
use crate::layout;
use crate::layout::AppliedReport;
use crate::layout::Canary;
use crate::layout::ConfigDocument;
use crate::layout::Format;
use crate::lease::LeaseState;

/// A check run on every parsed document before it is applied; `Err` keeps the previous value.
pub type Validator<T> = Arc<dyn Fn(&T) -> std::result::Result<(), String> + Send + Sync>;

/// The applied value and its version.
struct Applied<T> {
    value: Arc<T>,
    version: u64,
}

/// A live, typed view of a service's config. Cheap to clone; the watch task stops when the
/// last clone is dropped.
pub struct ConfigHandle<T> {
    rx: watch::Receiver<Arc<Applied<T>>>,
    _stop: Arc<DropGuard>,
}

impl<T> Clone for ConfigHandle<T> {
    fn clone(&self) -> Self {
        Self {
            rx: self.rx.clone(),
            _stop: self._stop.clone(),
        }
    }
}

impl<T> ConfigHandle<T> {
    /// The value of the last applied version.
    pub fn current(&self) -> Arc<T> {
        self.rx.borrow().value.clone()
    }

    /// The last applied version (0: `T::default()`, nothing applied yet).
    pub fn version(&self) -> u64 {
        self.rx.borrow().version
    }

    /// Waits until a version newer than the one this handle last returned is applied and
    /// returns it. Versions applied back to back before the caller asks again are seen as one
    /// wake-up with the latest value.
    pub async fn changed(&mut self) -> Result<Arc<T>> {
        self.rx
            .changed()
            .await
            .map_err(|_| Error::Closed("config handle"))?;
        Ok(self.rx.borrow_and_update().value.clone())
    }

    /// Calls `apply(value, version)` for every version applied from now on, until `shutdown` is
    /// cancelled or the handle's watch ends; spawn it as a task.
    pub async fn for_each(
        mut self,
        shutdown: CancellationToken,
        mut apply: impl FnMut(Arc<T>, u64) + Send,
    ) {
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = self.changed() => next,
            };
            match next {
                Ok(value) => {
                    let version = self.version();
                    apply(value, version);
                }
                Err(e) => {
                    tracing::warn!("config follow ended: {e}");
                    return;
                }
            }
        }
    }
}

/// Parses a document's body into `T`. Unknown fields are an error even when `T` would ignore
/// them: a misspelt key in a config file must not pass silently.
pub fn parse_document<T: DeserializeOwned>(doc: &ConfigDocument) -> std::result::Result<T, String> {
    let mut unknown = Vec::new();
    let value: T = match doc.format {
        Format::Toml => {
            let de = toml::Deserializer::parse(&doc.body).map_err(|e| e.to_string())?;
            serde_ignored::deserialize(de, |path| unknown.push(path.to_string()))
                .map_err(|e| e.to_string().trim_end().to_string())?
        }
        Format::Json => {
            let mut de = serde_json::Deserializer::from_str(&doc.body);
            let v = serde_ignored::deserialize(&mut de, |path| unknown.push(path.to_string()))
                .map_err(|e| e.to_string())?;
            de.end().map_err(|e| e.to_string())?;
            v
        }
    };
    if !unknown.is_empty() {
        return Err(format!("unknown field(s): {}", unknown.join(", ")));
    }
    Ok(value)
}

/// What the task needs besides the channel.
struct Task<T> {
    keeper: Keeper,
    service: String,
    validate: Validator<T>,
    tx: watch::Sender<Arc<Applied<T>>>,
    /// The last document tried (applied or rejected), so a re-read of the same document (the
    /// other key's event at the same revision, a promote of the canary we run) is a no-op.
    last_tried: Option<ConfigDocument>,
    /// The last report written, re-written when the session lease is re-granted.
    last_report: Option<AppliedReport>,
    /// Both keys have been read at this revision or later; older triggers are ignored.
    read_at: i64,
}

impl Keeper {
    /// A handle on `service`'s config as a `T`. Publishes `T`'s JSON Schema under
    /// `/schema/{service}`, loads the current document and follows every new one. Fails with
    /// [`Error::NoConfig`] when nothing has been pushed, [`Error::Parse`] when the current
    /// document does not parse.
    pub async fn config<T>(&self, service: &str) -> Result<ConfigHandle<T>>
    where
        T: DeserializeOwned + JsonSchema + Send + Sync + 'static,
    {
        self.config_inner(service, Arc::new(|_: &T| Ok(())), None)
            .await
    }

    /// [`Keeper::config`] with a validation step after parsing.
    pub async fn config_with<T>(
        &self,
        service: &str,
        validate: impl Fn(&T) -> std::result::Result<(), String> + Send + Sync + 'static,
    ) -> Result<ConfigHandle<T>>
    where
        T: DeserializeOwned + JsonSchema + Send + Sync + 'static,
    {
        self.config_inner(service, Arc::new(validate), None).await
    }

    /// [`Keeper::config`] that starts from `T::default()` (version 0) when no document was
    /// pushed yet, or when the current one does not parse (that failure is reported).
    pub async fn config_or_default<T>(&self, service: &str) -> Result<ConfigHandle<T>>
    where
        T: DeserializeOwned + JsonSchema + Default + Send + Sync + 'static,
    {
        self.config_inner(service, Arc::new(|_: &T| Ok(())), Some(T::default()))
            .await
    }

    /// [`Keeper::config_or_default`] with a validation step after parsing: a document that fails
    /// it is not applied and its error is reported under `/applied`, like a parse error.
    pub async fn config_or_default_with<T>(
        &self,
        service: &str,
        validate: impl Fn(&T) -> std::result::Result<(), String> + Send + Sync + 'static,
    ) -> Result<ConfigHandle<T>>
    where
        T: DeserializeOwned + JsonSchema + Default + Send + Sync + 'static,
    {
        self.config_inner(service, Arc::new(validate), Some(T::default()))
            .await
    }

    async fn config_inner<T>(
        &self,
        service: &str,
        validate: Validator<T>,
        default: Option<T>,
    ) -> Result<ConfigHandle<T>>
    where
        T: DeserializeOwned + JsonSchema + Send + Sync + 'static,
    {
        layout::check_name("service", service).map_err(Error::Invalid)?;
        self.publish_schema::<T>(service).await?;
        let keys = [
            layout::config_key(service),
            layout::config_canary_key(service),
        ];
        let (kvs, revision) = self.get_keys_at(&keys, 0).await?;
        let (config, canary) = decode_pair(&kvs);
        let effective =
            layout::effective_document(config.as_ref(), canary.as_ref(), self.instance()).cloned();

        let mut last_tried = None;
        let mut last_report = None;
        let initial = match (effective, default) {
            (None, None) => {
                return Err(Error::NoConfig {
                    service: service.to_string(),
                });
            }
            (None, Some(d)) => Applied {
                value: Arc::new(d),
                version: 0,
            },
            (Some(doc), default) => {
                let outcome = evaluate(&validate, &doc);
                last_report = Some(report_for(&doc, &outcome));
                last_tried = Some(doc.clone());
                match (outcome, default) {
                    (Ok(value), _) => Applied {
                        value: Arc::new(value),
                        version: doc.version,
                    },
                    (Err(message), Some(d)) => {
                        tracing::warn!(service, version = doc.version, %message, "config rejected; starting from the default");
                        Applied {
                            value: Arc::new(d),
                            version: 0,
                        }
                    }
                    (Err(message), None) => {
                        let task_report =
                            Task::<T>::write_report(self, service, last_report.as_ref());
                        task_report.await;
                        return Err(Error::Parse {
                            service: service.to_string(),
                            version: doc.version,
                            message,
                        });
                    }
                }
            }
        };
        let (tx, rx) = watch::channel(Arc::new(initial));
        let task = Task {
            keeper: self.clone(),
            service: service.to_string(),
            validate,
            tx,
            last_tried,
            last_report,
            read_at: revision,
        };
        task.report().await;
        let cancel = CancellationToken::new();
        tokio::spawn(task.run(revision + 1, cancel.clone()));
        Ok(ConfigHandle {
            rx,
            _stop: Arc::new(cancel.drop_guard()),
        })
    }

    /// Writes `T`'s JSON Schema under `/schema/{service}` unless the same schema is there.
    async fn publish_schema<T: JsonSchema>(&self, service: &str) -> Result<()> {
        let schema = serde_json::to_value(schemars::schema_for!(T))
            .map_err(|e| Error::Invalid(format!("schema of the config type: {e}")))?;
        let key = layout::schema_key(service);
        let stored = self.get(&key).await?;
        let same = stored
            .as_ref()
            .and_then(|kv| serde_json::from_slice::<serde_json::Value>(&kv.value).ok())
            .is_some_and(|v| v == schema);
        if !same {
            let body = serde_json::to_vec_pretty(&schema)
                .map_err(|e| Error::Invalid(format!("schema of the config type: {e}")))?;
            self.put(&key, body).await?;
        }
        Ok(())
    }
}

fn decode_pair(kvs: &[Option<KeyValue>]) -> (Option<ConfigDocument>, Option<Canary>) {
    let decode = |i: usize| kvs.get(i).cloned().flatten();
    let config = decode(0).and_then(|kv| match kv.json::<ConfigDocument>() {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a config document that is not a ConfigDocument");
            None
        }
    });
    let canary = decode(1).and_then(|kv| match kv.json::<Canary>() {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a canary that is not a Canary");
            None
        }
    });
    (config, canary)
}

/// Parses and validates a document.
fn evaluate<T: DeserializeOwned>(
    validate: &Validator<T>,
    doc: &ConfigDocument,
) -> std::result::Result<T, String> {
    let value = parse_document::<T>(doc)?;
    validate(&value).map_err(|e| format!("validation failed: {e}"))?;
    Ok(value)
}

fn report_for<T>(doc: &ConfigDocument, outcome: &std::result::Result<T, String>) -> AppliedReport {
    AppliedReport {
        version: doc.version,
        ok: outcome.is_ok(),
        error: outcome.as_ref().err().cloned(),
    }
}

fn same_document(a: &ConfigDocument, b: &ConfigDocument) -> bool {
    a.version == b.version && a.format == b.format && a.body == b.body
}

impl<T> Task<T>
where
    T: DeserializeOwned + Send + Sync + 'static,
{
    /// Parses, validates and (if good) publishes `doc`; reports the outcome either way.
    async fn try_apply(&mut self, doc: &ConfigDocument) {
        let outcome = evaluate(&self.validate, doc);
        self.last_report = Some(report_for(doc, &outcome));
        self.last_tried = Some(doc.clone());
        match outcome {
            Ok(value) => {
                self.tx.send_replace(Arc::new(Applied {
                    value: Arc::new(value),
                    version: doc.version,
                }));
                tracing::info!(service = %self.service, version = doc.version, "config applied");
            }
            Err(message) => {
                tracing::warn!(service = %self.service, version = doc.version, %message, "config rejected; keeping the previous value");
            }
        }
        self.report().await;
    }

    /// Writes the last report under `/applied`, on the session lease.
    async fn report(&self) {
        Self::write_report(&self.keeper, &self.service, self.last_report.as_ref()).await;
    }

    async fn write_report(keeper: &Keeper, service: &str, report: Option<&AppliedReport>) {
        let Some(report) = report else {
            return;
        };
        let key = layout::applied_key(service, keeper.instance());
        let body = match serde_json::to_vec(report) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode an applied report");
                return;
            }
        };
        let written = match keeper.session_lease().await {
            Ok(lease) => keeper.put_leased(&key, body, lease).await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            tracing::warn!(%key, error = %e, "applied report not written; will retry with the next change or lease renewal");
        }
    }

    /// Reads both keys at `revision` (0 = now) and applies the effective document if it is new.
    async fn reload(&mut self, revision: i64) -> Result<()> {
        let keys = [
            layout::config_key(&self.service),
            layout::config_canary_key(&self.service),
        ];
        let read = match self.keeper.get_keys_at(&keys, revision).await {
            Err(Error::Status(s)) if s.code() == tonic::Code::OutOfRange && revision > 0 => {
                // That revision was compacted away, or the node we asked has not applied it
                // yet: the current state supersedes it either way.
                self.keeper.get_keys_at(&keys, 0).await
            }
            other => other,
        };
        let (kvs, at) = read?;
        self.read_at = self.read_at.max(at);
        let (config, canary) = decode_pair(&kvs);
        let Some(doc) =
            layout::effective_document(config.as_ref(), canary.as_ref(), self.keeper.instance())
                .cloned()
        else {
            tracing::warn!(service = %self.service, "config document deleted; keeping the current value");
            return Ok(());
        };
        if self
            .last_tried
            .as_ref()
            .is_some_and(|t| same_document(t, &doc))
        {
            return Ok(());
        }
        self.try_apply(&doc).await;
        Ok(())
    }

    async fn run(mut self, from: i64, cancel: CancellationToken) {
        let config_key = layout::config_key(&self.service);
        let canary_key = layout::config_canary_key(&self.service);
        let mut config_watch = self.keeper.watch_key_lazy(&config_key, from);
        let mut canary_watch = self.keeper.watch_key_lazy(&canary_key, from);
        let mut session = self.keeper.session().await;
        let mut backoff = crate::backoff::Backoff::default();
        loop {
            let (which, next) = tokio::select! {
                _ = cancel.cancelled() => return,
                r = config_watch.next() => (0, r),
                r = canary_watch.next() => (1, r),
                changed = session.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let state = *session.borrow_and_update();
                    if matches!(state, LeaseState::Live(_)) {
                        self.report().await;
                    }
                    continue;
                }
            };
            let trigger = match next {
                Ok(events) => events.iter().map(|e| e.revision).max().unwrap_or(0),
                Err(Error::Compacted { compact_revision }) => {
                    tracing::warn!(
                        service = %self.service,
                        compact_revision,
                        "config watch history compacted; reloading the current state"
                    );
                    0
                }
                Err(e) => {
                    tracing::warn!(service = %self.service, error = %e, "config watch failed; retrying");
                    backoff.wait().await;
                    continue;
                }
            };
            if trigger != 0 && trigger <= self.read_at {
                continue;
            }
            match self.reload(trigger).await {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    // Not read: watch again from before this trigger so it comes back.
                    tracing::warn!(service = %self.service, error = %e, "config reload failed; retrying");
                    backoff.wait().await;
                    let again = self.read_at + 1;
                    config_watch = self.keeper.watch_key_lazy(&config_key, again);
                    canary_watch = self.keeper.watch_key_lazy(&canary_key, again);
                    continue;
                }
            }
            if trigger == 0 {
                // After a compaction, both watches restart from what was just read.
                let again = self.read_at + 1;
                if which == 0 {
                    config_watch = self.keeper.watch_key_lazy(&config_key, again);
                } else {
                    canary_watch = self.keeper.watch_key_lazy(&canary_key, again);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Cfg {
        name: String,
        #[serde(default)]
        limit: u32,
    }

    fn doc(format: Format, body: &str) -> ConfigDocument {
        ConfigDocument {
            version: 1,
            format,
            body: body.into(),
            updated_at: String::new(),
            author: String::new(),
        }
    }

    #[test]
    fn parses_toml_and_json() {
        let t: Cfg = parse_document(&doc(Format::Toml, "name = \"a\"\nlimit = 3\n")).unwrap();
        assert_eq!(
            t,
            Cfg {
                name: "a".into(),
                limit: 3
            }
        );
        let j: Cfg = parse_document(&doc(Format::Json, r#"{"name":"b"}"#)).unwrap();
        assert_eq!(
            j,
            Cfg {
                name: "b".into(),
                limit: 0
            }
        );
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_rejected() {
        let e = parse_document::<Cfg>(&doc(Format::Toml, "name = \"a\"\nlimt = 3\n")).unwrap_err();
        assert!(e.contains("limt"), "{e}");
        let e =
            parse_document::<Cfg>(&doc(Format::Toml, "name = \"a\"\nlimit = \"x\"\n")).unwrap_err();
        assert!(e.contains("line 2") || e.contains("2 |"), "{e}");
        let e = parse_document::<Cfg>(&doc(Format::Json, r#"{"name":"a","x":1}"#)).unwrap_err();
        assert!(e.contains('x'), "{e}");
        let e = parse_document::<Cfg>(&doc(Format::Json, r#"{"name":"a"} trailing"#)).unwrap_err();
        assert!(e.contains("trailing"), "{e}");
    }
}
