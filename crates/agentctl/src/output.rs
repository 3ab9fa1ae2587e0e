//! How agentctl prints an answer: with `--json`, the proto3 JSON of the response message (the
//! HTTP API's JSON); otherwise text for people, most often a table. Every command prints
//! through [`Output`], so the choice is made in one place; text an agent chose goes through
//! [`one_line`] on its way to the terminal.

use serde::Serialize;

/// `--json` or not.
#[derive(Clone, Copy)]
pub struct Output {
    pub json: bool,
}

impl Output {
    /// A whole answer: indented JSON, or `text`.
    pub fn answer<T: Serialize>(self, value: &T, text: impl FnOnce(&T)) {
        match self.json {
            true => print_json(value, true),
            false => text(value),
        }
    }

    /// One of several answers (an event of a stream, one per agent): a line of JSON each, so
    /// the output is JSON Lines, or `text`.
    pub fn item<T: Serialize>(self, value: &T, text: impl FnOnce(&T)) {
        match self.json {
            true => print_json(value, false),
            false => text(value),
        }
    }
}

/// A message that prints as a table row.
pub trait Row {
    const HEADER: &'static [&'static str];
    fn cells(&self) -> Vec<String>;
}

/// A table with one row per value, under its header (see [`print_table`]).
pub fn print_rows<R: Row>(values: &[R]) {
    let rows: Vec<Vec<String>> = values.iter().map(Row::cells).collect();
    print_table(R::HEADER, &rows);
}

/// Prints a message in the proto3 JSON mapping, the same JSON the HTTP API answers with.
pub fn print_json(message: &impl Serialize, pretty: bool) {
    let printed = if pretty {
        serde_json::to_string_pretty(message)
    } else {
        serde_json::to_string(message)
    };
    match printed {
        Ok(text) => println!("{text}"),
        Err(error) => eprintln!("agentctl: cannot print JSON: {error}"),
    }
}

/// Text an agent or the daemon chose, made safe for a terminal: control characters (a
/// script's newlines, an escape sequence planted in a name or a log) written as escapes, so
/// nothing an agent writes can move the cursor, retitle the window or fake a line.
pub fn one_line(text: &str) -> String {
    // Bidirectional overrides and isolates would reorder what follows them on the line.
    let unsafe_char =
        |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    text.chars()
        .flat_map(|c| match unsafe_char(c) {
            true => c.escape_default().collect::<Vec<_>>(),
            false => vec![c],
        })
        .collect()
}

/// One line per row, whatever the cells hold (see [`one_line`]), and a line wider than the
/// terminal (or `COLUMNS`) has its last column cut with `…`.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let rows: Vec<Vec<String>> = std::iter::once(header.iter().map(|h| h.to_string()).collect())
        .chain(
            rows.iter()
                .map(|row| row.iter().map(|c| one_line(c)).collect()),
        )
        .collect();
    let mut widths: Vec<usize> = vec![0; header.len()];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let columns = terminal_width();
    for row in rows {
        let padded: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let line = padded.join("  ");
        let line = line.trim_end();
        match columns {
            Some(columns) if line.chars().count() > columns => {
                let cut: String = line.chars().take(columns.saturating_sub(1)).collect();
                println!("{cut}…");
            }
            _ => println!("{line}"),
        }
    }
}

/// `COLUMNS` if set, else the width of the terminal on stdout; `None` when stdout is not a
/// terminal (a pipe gets whole lines).
fn terminal_width() -> Option<usize> {
    use std::io::IsTerminal;
    if let Some(columns) = std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()) {
        return Some(columns);
    }
    if !std::io::stdout().is_terminal() {
        return None;
    }
    let mut size = nix::libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct it is given.
    let read = unsafe { nix::libc::ioctl(1, nix::libc::TIOCGWINSZ, &mut size) };
    (read == 0 && size.ws_col > 0).then_some(usize::from(size.ws_col))
}
