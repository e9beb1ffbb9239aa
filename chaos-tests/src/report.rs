//! Output that shows even when the test harness captures stdout: figures and verdicts are
//! written straight to the process's stderr, so `cargo test` prints them in every run.

use std::io::Write;

/// Writes `text` (and a newline) to stderr, bypassing the test harness's capture.
pub fn say(text: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "{text}");
    let _ = e.flush();
}

/// A plain text table.
#[derive(Debug, Default)]
pub struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(head: &[&str]) -> Self {
        Self {
            head: head.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, columns padded.
    pub fn render(&self) -> String {
        let cols = self.head.len();
        let mut width = vec![0; cols];
        for r in std::iter::once(&self.head).chain(self.rows.iter()) {
            for (i, c) in r.iter().enumerate().take(cols) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let line = |r: &Vec<String>| {
            r.iter()
                .enumerate()
                .take(cols)
                .map(|(i, c)| format!("{c:<w$}", w = width[i]))
                .collect::<Vec<_>>()
                .join(" | ")
                .trim_end()
                .to_owned()
        };
        let mut out = vec![line(&self.head)];
        out.push(
            width
                .iter()
                .map(|w| "-".repeat(*w))
                .collect::<Vec<_>>()
                .join("-+-"),
        );
        out.extend(self.rows.iter().map(line));
        out.join("\n")
    }
}

/// Formats a duration as milliseconds.
pub fn ms(d: std::time::Duration) -> String {
    format!("{}", d.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_their_columns() {
        let mut t = Table::new(&["kill", "ms"]);
        t.row(vec!["1".into(), "3500".into()]);
        t.row(vec!["10".into(), "7".into()]);
        assert_eq!(t.render(), "kill | ms\n-----+-----\n1    | 3500\n10   | 7");
    }
}
