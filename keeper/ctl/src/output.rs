//! How results are shown: tables and text for people, JSON for scripts.

use std::io::IsTerminal;

use comfy_table::Table;
use comfy_table::presets::UTF8_FULL_CONDENSED;
use serde::Serialize;

/// Where output goes and in which form.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    /// `--json`: one JSON document (or one per line for streams) on stdout, nothing else there.
    pub json: bool,
    /// ANSI colours only when stdout is a terminal.
    pub color: bool,
}

impl Out {
    pub fn new(json: bool) -> Self {
        Self {
            json,
            color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        }
    }

    /// Prints `value` as pretty JSON.
    pub fn json<T: Serialize>(&self, value: &T) -> anyhow::Result<()> {
        println!("{}", serde_json::to_string_pretty(value)?);
        Ok(())
    }

    /// Prints a table with `header` and `rows`.
    pub fn table(&self, header: &[&str], rows: Vec<Vec<String>>) {
        let mut table = Table::new();
        table.load_preset(UTF8_FULL_CONDENSED);
        table.set_header(header.iter().copied());
        for row in rows {
            table.add_row(row);
        }
        println!("{table}");
    }
}

/// Seconds as a short age: `42s`, `5m3s`, `2h10m`, `3d4h`.
pub fn age(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Seconds since an RFC 3339 timestamp, if it parses.
pub fn seconds_since(rfc3339: &str) -> Option<i64> {
    let t = chrono::DateTime::parse_from_rfc3339(rfc3339).ok()?;
    Some((chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds())
}

/// Who is pushing: `$USER@host`.
pub fn author() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{user}@{host}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_short() {
        assert_eq!(age(5), "5s");
        assert_eq!(age(303), "5m3s");
        assert_eq!(age(7800), "2h10m");
        assert_eq!(age(273_600), "3d4h");
        assert_eq!(age(-3), "0s");
    }
}
