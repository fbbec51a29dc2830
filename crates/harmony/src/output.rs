//! Human tables and JSON output, and the printing macros every command uses.
//!
//! Nothing the binary prints may take a process down: `println!` panics when stdout is a
//! closed pipe (`harmony task ls | head -1`), and a node whose log pipe closed must keep
//! running and still obey signals. So the binary prints only through [`outln!`], [`out!`] and
//! [`errln!`], which drop what cannot be written.

use serde::Serialize;

/// Longest run of non-blank characters an error line shows in full. Longer runs are echoed
/// values (a URL, a name, a size, a line of a tasks file) and are cut.
pub const ECHO_RUN_MAX_CHARS: usize = 120;
/// How much of a cut run is kept.
pub const ECHO_KEPT_CHARS: usize = 80;
/// Longest error line; a longer one (many values, or one with blanks in it) keeps its start
/// and its end, where the advice is.
pub const ERROR_LINE_MAX_CHARS: usize = 2000;

/// Makes an error line readable whatever the user gave: a value echoed in it (a 1 MB `--db`
/// URL, a tasks-file name of 100,000 characters) is cut to its first [`ECHO_KEPT_CHARS`]
/// characters and its length, and the whole line to [`ERROR_LINE_MAX_CHARS`]. The words of
/// the message are short, so only what the user typed is ever cut; cutting here, where every
/// error is printed, covers every message rather than the ones someone remembered.
pub fn readable(line: &str) -> String {
    let mut out = String::with_capacity(line.len().min(ERROR_LINE_MAX_CHARS + 64));
    let mut rest = line;
    while !rest.is_empty() {
        let blank = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let (run, tail) = rest.split_at(blank);
        let chars = run.chars().count();
        if chars > ECHO_RUN_MAX_CHARS {
            let kept: String = run.chars().take(ECHO_KEPT_CHARS).collect();
            out.push_str(&kept);
            out.push_str(&format!("…[{chars} characters in all]"));
        } else {
            out.push_str(run);
        }
        let word = tail
            .find(|c: char| !c.is_whitespace())
            .unwrap_or(tail.len());
        out.push_str(&tail[..word]);
        rest = &tail[word..];
    }
    let total = out.chars().count();
    if total <= ERROR_LINE_MAX_CHARS {
        return out;
    }
    let head: String = out.chars().take(ERROR_LINE_MAX_CHARS / 2).collect();
    let tail: String = out.chars().skip(total - ERROR_LINE_MAX_CHARS / 4).collect();
    format!(
        "{head} …[{} characters cut]… {tail}",
        total - head.chars().count() - tail.chars().count()
    )
}

/// `println!` that ignores a closed or failing stdout.
macro_rules! outln {
    () => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout());
    }};
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `print!` that ignores a closed or failing stdout.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` that ignores a closed or failing stderr.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// A log writer over stderr that reports every write as done, so a closed log pipe neither
/// panics a logging call nor makes `tracing` print its own complaint (to the same closed pipe).
pub struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Prints `value` as pretty JSON on stdout.
pub fn json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A plain text table with left-aligned columns.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (one cell per column).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Whether no rows were added.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Renders to a string, each line ending in a newline.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(cell.chars().count());
                }
            }
        }
        let mut out = String::new();
        let line = |cells: &[String], out: &mut String| {
            let mut parts = Vec::with_capacity(cells.len());
            for (i, cell) in cells.iter().enumerate() {
                let w = widths.get(i).copied().unwrap_or(0);
                parts.push(format!("{cell:<w$}"));
            }
            out.push_str(parts.join("  ").trim_end());
            out.push('\n');
        };
        line(&self.header, &mut out);
        for row in &self.rows {
            line(row, &mut out);
        }
        out
    }

    /// Prints the table to stdout.
    pub fn print(&self) {
        out!("{}", self.render());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns() {
        let mut t = Table::new(&["ID", "NAME"]);
        t.row(vec!["1".into(), "SDR".into()]);
        t.row(vec!["1000".into(), "PoRep".into()]);
        assert_eq!(t.render(), "ID    NAME\n1     SDR\n1000  PoRep\n");
    }
}

#[cfg(test)]
mod readable_tests {
    use super::*;

    #[test]
    fn short_lines_are_unchanged() {
        let line = "error: --ram: \"12XB\": unknown unit \"XB\"; use B, KiB, MiB, GiB or TiB";
        assert_eq!(readable(line), line);
        assert_eq!(readable(""), "");
        assert_eq!(readable("  two  blanks\tkept "), "  two  blanks\tkept ");
    }

    #[test]
    fn a_long_value_is_cut_and_the_advice_kept() {
        let value = "é".repeat(1_000_000);
        let line = format!("error: task type {value:?} is 1000000 characters; the limit is 16");
        let shown = readable(&line);
        assert!(shown.chars().count() < 200, "{shown}");
        assert!(shown.starts_with("error: task type \"éééé"), "{shown}");
        assert!(shown.contains("…[1000002 characters in all]"), "{shown}");
        assert!(
            shown.ends_with(" is 1000000 characters; the limit is 16"),
            "{shown}"
        );
    }

    #[test]
    fn a_long_line_of_short_words_keeps_its_ends() {
        let line = format!("error: start {} the advice", "ab ".repeat(100_000));
        let shown = readable(&line);
        assert!(
            shown.chars().count() <= ERROR_LINE_MAX_CHARS + 64,
            "{}",
            shown.len()
        );
        assert!(shown.starts_with("error: start ab") && shown.ends_with("ab  the advice"));
        assert!(shown.contains("characters cut]"));
    }
}
