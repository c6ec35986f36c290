//! A unified diff of two config bodies, coloured when shown on a terminal.

use similar::TextDiff;

const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const CYAN: &str = "\x1b[36m";
const BOLD: &str = "\x1b[1m";
const RESET: &str = "\x1b[0m";

/// The unified diff from `old` to `new` (empty when equal), ANSI-coloured when `color`.
pub fn unified(old: &str, new: &str, old_label: &str, new_label: &str, color: bool) -> String {
    if old == new {
        return String::new();
    }
    let diff = TextDiff::from_lines(old, new);
    let text = diff
        .unified_diff()
        .context_radius(3)
        .header(old_label, new_label)
        .missing_newline_hint(true)
        .to_string();
    if !color {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 64);
    for line in text.split_inclusive('\n') {
        let (body, newline) = match line.strip_suffix('\n') {
            Some(b) => (b, "\n"),
            None => (line, ""),
        };
        let colour = if body.starts_with("+++") || body.starts_with("---") {
            BOLD
        } else if body.starts_with('+') {
            GREEN
        } else if body.starts_with('-') {
            RED
        } else if body.starts_with("@@") {
            CYAN
        } else {
            ""
        };
        if colour.is_empty() {
            out.push_str(line);
        } else {
            out.push_str(&format!("{colour}{body}{RESET}{newline}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "name = \"a\"\nport = 1\nhost = \"h\"\n";
    const NEW: &str = "name = \"a\"\nport = 2\nhost = \"h\"\n";

    #[test]
    fn equal_bodies_have_no_diff() {
        assert_eq!(unified(OLD, OLD, "v1", "new", true), "");
    }

    #[test]
    fn plain_diff_shows_removed_and_added_lines() {
        let d = unified(OLD, NEW, "version 1", "app.toml", false);
        assert!(d.contains("--- version 1\n"), "{d}");
        assert!(d.contains("+++ app.toml\n"), "{d}");
        assert!(d.contains("\n-port = 1\n"), "{d}");
        assert!(d.contains("\n+port = 2\n"), "{d}");
        assert!(d.contains("\n name = \"a\"\n"), "context kept: {d}");
        assert!(!d.contains('\x1b'), "no colour off a terminal: {d:?}");
    }

    #[test]
    fn coloured_diff_marks_lines() {
        let d = unified(OLD, NEW, "version 1", "app.toml", true);
        assert!(d.contains(&format!("{RED}-port = 1{RESET}\n")), "{d:?}");
        assert!(d.contains(&format!("{GREEN}+port = 2{RESET}\n")), "{d:?}");
        assert!(d.contains(&format!("{BOLD}--- version 1{RESET}")), "{d:?}");
        assert!(d.contains(CYAN), "hunk header coloured: {d:?}");
    }

    #[test]
    fn new_file_diffs_against_nothing() {
        let d = unified("", NEW, "(none)", "app.toml", false);
        assert!(d.contains("+port = 2"), "{d}");
    }
}
