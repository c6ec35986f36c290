//! What a run found ([`RunReport`]), the steps every workload's run shares around its own
//! driver ([`carry_out`]: output directory, history recorder, counts, `verdict.json`), and the
//! summary table over many runs.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::history::Entry;
use crate::history::Outcome;
use crate::history::Recorder;

/// What one run found.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub run: usize,
    pub dir: PathBuf,
    pub seed: u64,
    pub ops: usize,
    pub ok: usize,
    pub fail: usize,
    pub unknown: usize,
    pub faults: usize,
    /// Watch events received (keeper), OK lookups (register), messages delivered (push).
    pub events: usize,
    /// Property violations (empty = valid).
    pub anomalies: Vec<String>,
    /// The run could not be carried out (harness or environment problem).
    pub error: Option<String>,
    /// Whether the linearizability checker found a violation (what `--expect-anomaly` wants).
    pub linearizability_violated: bool,
    pub seconds: f64,
}

impl RunReport {
    /// An empty report of run `run` writing into `dir`.
    pub fn new(run: usize, dir: PathBuf, seed: u64) -> Self {
        Self {
            run,
            dir,
            seed,
            ops: 0,
            ok: 0,
            fail: 0,
            unknown: 0,
            faults: 0,
            events: 0,
            anomalies: Vec::new(),
            error: None,
            linearizability_violated: false,
            seconds: 0.0,
        }
    }

    /// Sets the operation counts from the outcomes of the run's operations.
    pub fn count(&mut self, outcomes: impl Iterator<Item = Outcome>) {
        let outcomes: Vec<Outcome> = outcomes.collect();
        let n = |want: Outcome| outcomes.iter().filter(|o| **o == want).count();
        self.ops = outcomes.len();
        self.ok = n(Outcome::Ok);
        self.fail = n(Outcome::Fail);
        self.unknown = n(Outcome::Unknown);
    }

    /// Whether the run failed: an error or an anomaly.
    pub fn bad(&self) -> bool {
        self.error.is_some() || !self.anomalies.is_empty()
    }

    /// Writes `verdict.json` into the run's directory.
    pub fn write_verdict(&self) {
        if let Ok(mut f) = std::fs::File::create(self.dir.join("verdict.json")) {
            let _ = writeln!(
                f,
                "{}",
                serde_json::to_string_pretty(self).unwrap_or_default()
            );
        }
    }

    /// `ERROR` (the run could not be carried out), `valid` or `ANOMALY`.
    pub fn verdict(&self) -> &'static str {
        if self.error.is_some() {
            "ERROR"
        } else if self.anomalies.is_empty() {
            "valid"
        } else {
            "ANOMALY"
        }
    }
}

/// Carries out run `run` in `<out>/run-<run>`: `drive` acts, recording the history and filling
/// the report; then `tally` counts the recorded entries into it and `verdict.json` is written.
pub async fn carry_out(
    out: &Path,
    run: usize,
    seed: u64,
    drive: impl AsyncFnOnce(&Recorder, &mut RunReport) -> anyhow::Result<()>,
    tally: impl FnOnce(&mut RunReport, &[Entry]),
) -> RunReport {
    let dir = out.join(format!("run-{run}"));
    let started = Instant::now();
    let mut report = RunReport::new(run, dir.clone(), seed);
    let rec = match open_history(&dir) {
        Ok(rec) => rec,
        Err(e) => {
            report.error = Some(format!("cannot create {}: {e:#}", dir.display()));
            return report;
        }
    };
    if let Err(e) = drive(&rec, &mut report).await {
        report.error = Some(format!("{e:#}"));
    }
    rec.flush();
    report.seconds = started.elapsed().as_secs_f64();
    tally(&mut report, &rec.entries());
    report.write_verdict();
    report
}

/// Creates the run's directory and the recorder of its history in it.
fn open_history(dir: &Path) -> anyhow::Result<Recorder> {
    std::fs::create_dir_all(dir)?;
    Recorder::create(dir)
}

/// The table printed after all runs.
pub fn summary(reports: &[RunReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>4} {:>7} {:>7} {:>6} {:>8} {:>7} {:>8} {:>8}  verdict",
        "run", "ops", "ok", "fail", "unknown", "faults", "events", "secs"
    );
    for r in reports {
        let _ = writeln!(
            out,
            "{:>4} {:>7} {:>7} {:>6} {:>8} {:>7} {:>8} {:>8.1}  {}{}",
            r.run,
            r.ops,
            r.ok,
            r.fail,
            r.unknown,
            r.faults,
            r.events,
            r.seconds,
            r.verdict(),
            if !r.bad() {
                String::new()
            } else {
                format!(" ({})", r.dir.display())
            }
        );
    }
    out
}
