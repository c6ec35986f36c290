//! The comparison: one row per measured quantity, keeper and etcd side by side with their ratio.

use std::fmt::Write;

use serde::Serialize;

use crate::results::System;
use crate::results::SystemResults;

#[derive(Debug, Serialize)]
pub struct Report {
    /// Headers of the table: workload, keeper, etcd (with its version), keeper/etcd.
    pub columns: [String; 4],
    pub rows: Vec<Row>,
    pub keeper: Option<SystemResults>,
    pub etcd: Option<SystemResults>,
}

#[derive(Debug, Serialize)]
pub struct Row {
    /// e.g. `put c=64`.
    pub workload: String,
    /// `ops/s`, `p50 ms`, `p99 ms`, `max ms` or `deliveries`.
    pub metric: &'static str,
    pub keeper: Option<f64>,
    pub etcd: Option<f64>,
    /// keeper / etcd: above 1 keeper does more ops/s, or takes longer.
    pub ratio: Option<f64>,
}

impl Report {
    /// Pairs up result sets by system; either may be missing (its column shows `-`).
    pub fn build(sets: Vec<SystemResults>) -> anyhow::Result<Self> {
        let mut keeper = None;
        let mut etcd = None;
        for set in sets {
            let slot = match set.system {
                System::Keeper => &mut keeper,
                System::Etcd => &mut etcd,
            };
            anyhow::ensure!(slot.is_none(), "two result files for {}", set.system);
            *slot = Some(set);
        }
        let etcd_label = match &etcd {
            Some(set) => format!("etcd {}", major_minor(&set.version)),
            None => "etcd".to_owned(),
        };
        let columns = [
            "workload".to_owned(),
            "keeper".to_owned(),
            etcd_label,
            "keeper/etcd".to_owned(),
        ];
        let rows = rows(keeper.as_ref(), etcd.as_ref());
        Ok(Self {
            columns,
            rows,
            keeper,
            etcd,
        })
    }

    /// A Markdown table (so it can be pasted into docs/benchmarks.md), columns padded to line up.
    pub fn table(&self) -> String {
        let cells: Vec<[String; 4]> = self
            .rows
            .iter()
            .map(|row| {
                [
                    format!("{} {}", row.workload, row.metric),
                    number(row.metric, row.keeper),
                    number(row.metric, row.etcd),
                    row.ratio
                        .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x")),
                ]
            })
            .collect();
        let mut widths = self.columns.each_ref().map(String::len);
        for row in &cells {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.len());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: &[String; 4]| {
            let [w0, w1, w2, w3] = widths;
            let [c0, c1, c2, c3] = cells;
            let _ = writeln!(out, "| {c0:<w0$} | {c1:>w1$} | {c2:>w2$} | {c3:>w3$} |");
        };
        line(&mut out, &self.columns);
        let [w0, w1, w2, w3] = widths;
        let _ = writeln!(
            out,
            "|{}|{}:|{}:|{}:|",
            "-".repeat(w0 + 2),
            "-".repeat(w1 + 1),
            "-".repeat(w2 + 1),
            "-".repeat(w3 + 1)
        );
        for row in &cells {
            line(&mut out, row);
        }
        out.push_str(
            "\nkeeper/etcd above 1.00x: keeper does more ops/s, or takes longer (latency rows).\n",
        );
        out
    }
}

fn rows(keeper: Option<&SystemResults>, etcd: Option<&SystemResults>) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut push = |workload: &str, metric: &'static str, k: Option<f64>, e: Option<f64>| {
        let ratio = match (k, e) {
            (Some(k), Some(e)) if e > 0.0 => Some(k / e),
            _ => None,
        };
        rows.push(Row {
            workload: workload.to_owned(),
            metric,
            keeper: k,
            etcd: e,
            ratio,
        });
    };

    // Phases in the order they ran; a phase only one side ran still gets its rows.
    let mut names: Vec<&str> = Vec::new();
    for set in keeper.iter().chain(etcd.iter()) {
        for phase in &set.phases {
            if !names.contains(&phase.name.as_str()) {
                names.push(&phase.name);
            }
        }
    }
    let phase = |set: Option<&SystemResults>, name: &str| {
        set.and_then(|s| s.phases.iter().find(|p| p.name == name))
            .cloned()
    };
    for name in names {
        let (k, e) = (phase(keeper, name), phase(etcd, name));
        push(
            name,
            "ops/s",
            k.as_ref().map(|p| p.ops_per_s),
            e.as_ref().map(|p| p.ops_per_s),
        );
        push(
            name,
            "p50 ms",
            k.as_ref().map(|p| p.p50_ms),
            e.as_ref().map(|p| p.p50_ms),
        );
        push(
            name,
            "p99 ms",
            k.as_ref().map(|p| p.p99_ms),
            e.as_ref().map(|p| p.p99_ms),
        );
    }

    let (k, e) = (
        keeper.and_then(|s| s.watch.as_ref()),
        etcd.and_then(|s| s.watch.as_ref()),
    );
    if let Some(name) = k.or(e).map(|w| w.name.clone()) {
        push(&name, "p50 ms", k.map(|w| w.p50_ms), e.map(|w| w.p50_ms));
        push(&name, "p99 ms", k.map(|w| w.p99_ms), e.map(|w| w.p99_ms));
        push(&name, "max ms", k.map(|w| w.max_ms), e.map(|w| w.max_ms));
        push(
            &name,
            "deliveries",
            k.map(|w| w.deliveries as f64),
            e.map(|w| w.deliveries as f64),
        );
    }
    rows
}

fn number(metric: &str, value: Option<f64>) -> String {
    match value {
        None => "-".to_owned(),
        Some(v) if metric.ends_with("ms") => format!("{v:.2}"),
        Some(v) => format!("{v:.0}"),
    }
}

/// `3.4.23` -> `3.4`; anything else unchanged.
fn major_minor(version: &str) -> &str {
    match version.match_indices('.').nth(1) {
        Some((second_dot, _)) => &version[..second_dot],
        None => version,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::PhaseResult;

    fn set(system: System, version: &str, ops_per_s: f64, p50_ms: f64) -> SystemResults {
        SystemResults {
            system,
            version: version.to_owned(),
            endpoints: vec![],
            leader: None,
            warmup_s: 1.0,
            duration_s: 5.0,
            value_size: 256,
            phases: vec![PhaseResult {
                name: "put c=1".to_owned(),
                clients: 1,
                connections: 1,
                ops: 10,
                errors: 0,
                first_error: None,
                ops_per_s,
                p50_ms,
                p99_ms: p50_ms * 2.0,
                max_ms: p50_ms * 3.0,
            }],
            watch: None,
        }
    }

    #[test]
    fn ratio_is_keeper_over_etcd() {
        let report = Report::build(vec![
            set(System::Etcd, "3.4.23", 1000.0, 2.0),
            set(System::Keeper, "3.5.0", 2310.0, 1.0),
        ])
        .unwrap();
        assert_eq!(report.columns[2], "etcd 3.4");
        let table = report.table();
        assert!(
            table.contains("| put c=1 ops/s  |   2310 |     1000 |       2.31x |"),
            "{table}"
        );
        assert!(
            table.contains("| put c=1 p50 ms |   1.00 |     2.00 |       0.50x |"),
            "{table}"
        );
    }

    #[test]
    fn a_missing_side_shows_dashes() {
        let report = Report::build(vec![set(System::Etcd, "3.4.23", 1000.0, 2.0)]).unwrap();
        let table = report.table();
        assert!(
            table.contains("| put c=1 ops/s  |      - |     1000 |           - |"),
            "{table}"
        );
    }

    #[test]
    fn one_file_per_system() {
        let twice = vec![
            set(System::Etcd, "3.4.23", 1.0, 1.0),
            set(System::Etcd, "3.4.23", 1.0, 1.0),
        ];
        assert!(Report::build(twice).is_err());
    }
}
