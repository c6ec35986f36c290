//! The comparison: one row per measured quantity, keeper and etcd side by side with their ratio.

use std::fmt::Write;

use serde::Serialize;

use crate::results::System;
use crate::results::SystemResults;

#[derive(Debug, Serialize)]
pub struct Report {
    /// Headers of the table: workload, keeper, etcd (with its version), keeper/etcd, and with
    /// more than one round the range of the per-round ratios.
    pub columns: Vec<String>,
    /// Runs per system; round `i` pairs the `i`-th keeper result with the `i`-th etcd result.
    pub rounds: usize,
    pub rows: Vec<Row>,
    pub keeper: Vec<SystemResults>,
    pub etcd: Vec<SystemResults>,
}

#[derive(Debug, Serialize)]
pub struct Row {
    /// e.g. `put c=64`.
    pub workload: String,
    /// `ops/s`, `p50 ms`, `p99 ms`, `max ms` or `deliveries`.
    pub metric: &'static str,
    /// The median over the rounds.
    pub keeper: Option<f64>,
    pub etcd: Option<f64>,
    /// keeper / etcd: above 1 keeper does more ops/s, or takes longer. With several rounds, the
    /// median of the rounds' ratios (each round's two runs ran minutes apart at most).
    pub ratio: Option<f64>,
    /// Each round's value, in round order (a round that lacks the row has none).
    pub keeper_rounds: Vec<f64>,
    pub etcd_rounds: Vec<f64>,
    /// keeper / etcd of each round that measured both.
    pub round_ratios: Vec<f64>,
}

impl Report {
    /// Pairs up result sets by system, in the order given: the `i`-th of each system form round
    /// `i`. Either system may be missing (its column shows `-`); when both are there, they must
    /// have as many results each.
    pub fn build(sets: Vec<SystemResults>) -> anyhow::Result<Self> {
        let (keeper, etcd): (Vec<_>, Vec<_>) =
            sets.into_iter().partition(|s| s.system == System::Keeper);
        anyhow::ensure!(
            keeper.is_empty() || etcd.is_empty() || keeper.len() == etcd.len(),
            "{} keeper result file(s) but {} etcd: each round needs one of each",
            keeper.len(),
            etcd.len()
        );
        let rounds = keeper.len().max(etcd.len());
        let etcd_label = match etcd.first() {
            Some(set) => format!("etcd {}", major_minor(&set.version)),
            None => "etcd".to_owned(),
        };
        let mut columns = vec![
            "workload".to_owned(),
            "keeper".to_owned(),
            etcd_label,
            "keeper/etcd".to_owned(),
        ];
        if rounds > 1 {
            columns.push(format!("range of {rounds} rounds"));
        }
        let mut rows = (0..rounds.max(1))
            .map(|r| rows(keeper.get(r), etcd.get(r)))
            .reduce(merge)
            .unwrap_or_default();
        for row in &mut rows {
            row.keeper = median(&row.keeper_rounds);
            row.etcd = median(&row.etcd_rounds);
            row.ratio = median(&row.round_ratios);
        }
        Ok(Self {
            columns,
            rounds,
            rows,
            keeper,
            etcd,
        })
    }

    /// A Markdown table (so it can be pasted into docs/benchmarks.md), columns padded to line up.
    pub fn table(&self) -> String {
        let cells: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|row| {
                let mut cells = vec![
                    format!("{} {}", row.workload, row.metric),
                    number(row.metric, row.keeper),
                    number(row.metric, row.etcd),
                    row.ratio
                        .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x")),
                ];
                if self.rounds > 1 {
                    let low = row.round_ratios.iter().copied().reduce(f64::min);
                    let high = row.round_ratios.iter().copied().reduce(f64::max);
                    cells.push(match (low, high) {
                        (Some(low), Some(high)) => format!("{low:.2}x-{high:.2}x"),
                        _ => "-".to_owned(),
                    });
                }
                cells
            })
            .collect();
        let mut widths: Vec<usize> = self.columns.iter().map(String::len).collect();
        for row in &cells {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.len());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: &[String]| {
            for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
                let _ = match i {
                    0 => write!(out, "| {cell:<width$} "),
                    _ => write!(out, "| {cell:>width$} "),
                };
            }
            out.push_str("|\n");
        };
        line(&mut out, &self.columns);
        for (i, width) in widths.iter().enumerate() {
            let _ = match i {
                0 => write!(out, "|{}", "-".repeat(width + 2)),
                _ => write!(out, "|{}:", "-".repeat(width + 1)),
            };
        }
        out.push_str("|\n");
        for row in &cells {
            line(&mut out, row);
        }
        out.push_str(
            "\nkeeper/etcd above 1.00x: keeper does more ops/s, or takes longer (latency rows).\n",
        );
        if self.rounds > 1 {
            let _ = writeln!(
                out,
                "keeper and etcd: medians of {} rounds; keeper/etcd: the median of the rounds' ratios.",
                self.rounds
            );
        }
        out
    }
}

/// Folds the rows of one more round into the rows so far, collecting each row's values per
/// round (the medians are taken once all rounds are in). A row only some rounds have keeps the
/// values of those rounds.
fn merge(mut acc: Vec<Row>, next: Vec<Row>) -> Vec<Row> {
    for row in next {
        match acc
            .iter_mut()
            .find(|a| a.workload == row.workload && a.metric == row.metric)
        {
            Some(a) => {
                a.keeper_rounds.extend(row.keeper_rounds);
                a.etcd_rounds.extend(row.etcd_rounds);
                a.round_ratios.extend(row.round_ratios);
            }
            None => acc.push(row),
        }
    }
    acc
}

fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
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
            keeper_rounds: k.into_iter().collect(),
            etcd_rounds: e.into_iter().collect(),
            round_ratios: ratio.into_iter().collect(),
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
    fn rounds_show_medians_and_the_range_of_ratios() {
        let report = Report::build(vec![
            set(System::Keeper, "3.5.0", 2000.0, 1.0),
            set(System::Etcd, "3.4.23", 1000.0, 2.0),
            set(System::Keeper, "3.5.0", 2400.0, 1.0),
            set(System::Etcd, "3.4.23", 1000.0, 2.0),
            set(System::Keeper, "3.5.0", 2100.0, 3.0),
            set(System::Etcd, "3.4.23", 1200.0, 2.0),
        ])
        .unwrap();
        assert_eq!(report.rounds, 3);
        let ops = &report.rows[0];
        assert_eq!((ops.workload.as_str(), ops.metric), ("put c=1", "ops/s"));
        assert_eq!(ops.keeper_rounds, [2000.0, 2400.0, 2100.0]);
        // Medians per system, and the median of the rounds' ratios (2.0, 2.4, 1.75), which is
        // not the ratio of the medians (2.1).
        assert_eq!(
            (ops.keeper, ops.etcd, ops.ratio),
            (Some(2100.0), Some(1000.0), Some(2.0))
        );
        let table = report.table();
        assert!(
            table.contains(
                "| put c=1 ops/s  |   2100 |     1000 |       2.00x |       1.75x-2.40x |"
            ),
            "{table}"
        );
        assert!(table.contains("medians of 3 rounds"), "{table}");
    }

    #[test]
    fn rounds_need_one_result_of_each_system() {
        let uneven = vec![
            set(System::Keeper, "3.5.0", 1.0, 1.0),
            set(System::Etcd, "3.4.23", 1.0, 1.0),
            set(System::Etcd, "3.4.23", 1.0, 1.0),
        ];
        let e = Report::build(uneven).unwrap_err().to_string();
        assert!(e.contains("1 keeper result file(s) but 2 etcd"), "{e}");
    }
}
