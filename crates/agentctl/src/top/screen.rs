//! What `agentctl top` draws: a header, the agent table with the columns that fit the
//! terminal's width, the selected agent's output, and a footer of keys or of the prompt.
//! Nothing is cut in the middle of a word: a column that does not fit is left out whole
//! (the least useful first), and the header and footer drop or wrap whole parts.

use std::collections::BTreeMap;
use std::time::Instant;

use agentd_proto::v1 as pb;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, HighlightSpacing, Paragraph, Row, Table};

use super::{Prompt, SortBy, Top, runtime};
use crate::names::{health_name, is_live, state_name};
use crate::output::one_line;

/// The selection mark before the selected row.
const MARK: &str = "▶ ";

/// Below this many rows there is no output pane: the table takes them all.
const OUTPUT_PANE_FROM: u16 = 16;

/// The fewest columns the command is shown in.
const COMMAND_FROM: usize = 12;

/// The keys, in the order the footer lists them.
const KEYS: &[&str] = &[
    "q quit",
    "↑↓/j/k select",
    "g/G first/last",
    "sort: c cpu m mem r runtime e state i id",
    "t tree",
    "f states",
    "/ filter",
    "s stop",
    "K kill",
    "R restart",
    "p pause/resume",
    "d remove",
];

/// A `keep` this high always shows.
const ALWAYS: u8 = 10;

/// The agent table's columns, in order, each with its `keep`: when the terminal is too
/// narrow for all of them, the one with the lowest is left out first.
const COLUMNS: [(&str, u8); 12] = [
    ("AGENT", ALWAYS),
    ("STATE", ALWAYS),
    ("EXIT", 9),
    ("HEALTH", 3),
    ("CPU%", 8),
    ("MEM MiB", 7),
    ("THR", 1),
    ("RUNTIME", 6),
    ("PROGRESS", 2),
    ("RST", 4),
    ("SPEND", 5),
    ("COMMAND", 0),
];

impl Top {
    pub(super) fn draw(&mut self, frame: &mut Frame) {
        let area = frame.area();
        let footer = self.footer(area.width);
        let footer_height = footer.len() as u16;
        // The table gets most of the height: the output pane a third of what the header and
        // footer leave, at most 12 rows, and none on a terminal under 16 rows.
        let output_height = match area.height < OUTPUT_PANE_FROM {
            true => 0,
            false => (area.height.saturating_sub(2 + footer_height) / 3).min(12),
        };
        let [header, table, output, footer_area] = Layout::vertical([
            Constraint::Length(2),
            Constraint::Min(3),
            Constraint::Length(output_height),
            Constraint::Length(footer_height),
        ])
        .areas(area);
        self.draw_header(frame, header);
        self.draw_table(frame, table);
        if output_height > 0 {
            self.draw_output(frame, output);
        }
        frame.render_widget(Paragraph::new(footer), footer_area);
    }

    fn draw_header(&self, frame: &mut Frame, area: Rect) {
        let mut counts: BTreeMap<i32, usize> = BTreeMap::new();
        for (status, _) in self.agents.values() {
            *counts.entry(status.state).or_default() += 1;
        }
        let mut first = vec![Span::styled(
            "agentd ",
            Style::new().add_modifier(Modifier::BOLD),
        )];
        first.push(match &self.link {
            Ok(()) => Span::styled("live ", Style::new().fg(Color::Green)),
            Err(why) => Span::styled(format!("{why} "), Style::new().fg(Color::Red)),
        });
        for (state, count) in counts {
            first.push(Span::styled(
                format!(" {count} {}", state_name(state)),
                state_style(state),
            ));
        }
        let mut parts = vec![format!(
            "sort {}{}{}{}  show {}{}",
            self.sort.name(),
            if self.descending { "↓" } else { "↑" },
            if self.sort == SortBy::State {
                ""
            } else {
                " (live first)"
            },
            if self.tree { ", tree" } else { "" },
            self.states.name(),
            if self.filter.is_empty() {
                String::new()
            } else {
                format!("  filter `{}`", self.filter)
            },
        )];
        if let Some(s) = &self.summary {
            let host = s.host.unwrap_or_default();
            parts.push(format!(
                "load {:.0}/{:.0}  cpu {:.1}%  memory {:.1} MiB",
                s.total_load_percentage, s.capacity, s.total_cpu_percent, s.total_memory_mb,
            ));
            parts.push(format!(
                "host: {} CPUs, load {:.2}, {:.0} of {:.0} MiB free",
                host.cpus, host.load_average_1m, host.memory_available_mb, host.memory_total_mb,
            ));
        }
        // Whole parts, in order, as long as they fit.
        let mut second = String::new();
        for part in parts {
            let separator = if second.is_empty() { "" } else { "   " };
            if width(&second) + separator.len() + width(&part) <= usize::from(area.width) {
                second.push_str(separator);
                second.push_str(&part);
            }
        }
        frame.render_widget(
            Paragraph::new(vec![Line::from(first), Line::raw(second)]),
            area,
        );
    }

    fn draw_table(&mut self, frame: &mut Frame, area: Rect) {
        let cells: Vec<[String; COLUMNS.len()]> = self
            .rows
            .iter()
            .map(|(id, depth)| {
                let (status, at) = &self.agents[id];
                cells(id, *depth, status, *at)
            })
            .collect();
        let widest = |c: usize| cells.iter().map(|row| width(&row[c])).max().unwrap_or(0);
        // A column no agent has anything in (no progress reported, nothing spent) is left out.
        let mut kept: Vec<usize> = (0..COLUMNS.len())
            .filter(|&c| COLUMNS[c].1 >= ALWAYS || widest(c) > 0)
            .collect();
        let fits = |c: usize| match COLUMNS[c].0 {
            // Only an id longer than half the width is cut: other columns give way first.
            "AGENT" => widest(c).clamp(8, usize::from(area.width / 2).max(8)),
            // The command takes what is left, when that is enough to be worth showing.
            "COMMAND" => COMMAND_FROM,
            title => widest(c).max(width(title)),
        };
        let room = usize::from(area.width).saturating_sub(width(MARK));
        let needed = |kept: &[usize]| kept.iter().map(|&c| fits(c) + 1).sum::<usize>() - 1;
        loop {
            let least = (0..kept.len())
                .filter(|&i| COLUMNS[kept[i]].1 < ALWAYS)
                .min_by_key(|&i| COLUMNS[kept[i]].1);
            match least {
                Some(i) if needed(&kept) > room => drop(kept.remove(i)),
                _ => break,
            }
        }
        let command_width = room.saturating_sub(needed(&kept)) + COMMAND_FROM;
        let widths = kept.iter().map(|&c| match COLUMNS[c].0 {
            "COMMAND" => Constraint::Length(command_width as u16),
            _ => Constraint::Length(fits(c) as u16),
        });
        let header = Row::new(kept.iter().map(|&c| COLUMNS[c].0))
            .style(Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED));
        let rows = self.rows.iter().zip(&cells).map(|((id, _), row)| {
            let cell = |c: usize| match COLUMNS[c].0 {
                "COMMAND" => whole_words(&row[c], command_width),
                _ => row[c].clone(),
            };
            Row::new(kept.iter().map(|&c| cell(c))).style(state_style(self.agents[id].0.state))
        });
        let table = Table::new(rows, widths)
            .header(header)
            .row_highlight_style(
                Style::new()
                    .bg(Color::DarkGray)
                    .add_modifier(Modifier::BOLD),
            )
            .highlight_symbol(MARK)
            .highlight_spacing(HighlightSpacing::Always);
        frame.render_stateful_widget(table, area, &mut self.table);
    }

    fn draw_output(&self, frame: &mut Frame, area: Rect) {
        let title = match &self.selected {
            Some(id) => format!(" output of {id} "),
            None => " output ".into(),
        };
        let height = usize::from(area.height.saturating_sub(2));
        let lines: Vec<Line> = self
            .output
            .iter()
            .skip(self.output.len().saturating_sub(height))
            .map(|line| Line::raw(line.as_str()))
            .collect();
        frame.render_widget(
            Paragraph::new(lines).block(Block::bordered().title(title)),
            area,
        );
    }

    /// The footer's lines at this width: the keys, a question, the filter being typed, or
    /// how the last action went.
    fn footer(&self, columns: u16) -> Vec<Line<'static>> {
        let columns = usize::from(columns);
        let lines = |text: &str, style: Style| -> Vec<Line<'static>> {
            let words: Vec<&str> = text.split(' ').collect();
            pack(&words, " ", columns)
                .into_iter()
                .map(|line| Line::styled(line, style))
                .collect()
        };
        match &self.prompt {
            Prompt::Keys => pack(KEYS, "  ", columns)
                .into_iter()
                .map(Line::raw)
                .collect(),
            Prompt::Confirm { agent_id, action } => lines(
                &format!(
                    "{} {agent_id}? y to confirm, any other key to cancel",
                    action.question()
                ),
                Style::new().fg(Color::Black).bg(Color::Yellow),
            ),
            Prompt::Filter(text) => vec![Line::raw(format!(
                "filter (id, name, type, model, or KEY=VALUE): {text}▏"
            ))],
            Prompt::Message(message) => lines(message, Style::new()),
            Prompt::Failure(message) => lines(message, Style::new().fg(Color::Red)),
        }
    }
}

/// An agent's row, one cell per column of [`COLUMNS`].
fn cells(id: &str, depth: usize, s: &pb::AgentStatus, at: Instant) -> [String; COLUMNS.len()] {
    let live = is_live(s.state);
    // Figures that only mean something while the agent runs.
    let figure = |value: String| if live { value } else { String::new() };
    [
        match depth {
            0 => id.to_string(),
            d => format!("{}└ {id}", "  ".repeat(d - 1)),
        },
        state_name(s.state),
        match live {
            true => String::new(),
            false => ended_how(s.exit_code, s.exit_signal),
        },
        figure(health_name(s.health)),
        figure(format!("{:.1}", s.cpu_percent)),
        // An agent that ended holds no memory: the most its run held, said to be that.
        match live {
            true => format!("{:.1}", s.memory_mb),
            false if s.peak_memory_mb > 0.0 => format!("peak {:.1}", s.peak_memory_mb),
            false => String::new(),
        },
        figure(s.num_threads.to_string()),
        duration(runtime(s, at)),
        progress_bar(s.progress),
        s.restart_count.to_string(),
        spend(s),
        one_line(&s.cmdline.join(" ")),
    ]
}

/// `parts` joined by `separator` into lines of at most `columns`, never splitting a part.
fn pack(parts: &[&str], separator: &str, columns: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for part in parts {
        match lines.last_mut() {
            Some(line) if width(line) + separator.len() + width(part) <= columns => {
                line.push_str(separator);
                line.push_str(part);
            }
            _ => lines.push(part.to_string()),
        }
    }
    lines
}

/// As many whole words of `text` as fit in `columns`, then `…` if some were left out.
fn whole_words(text: &str, columns: usize) -> String {
    if width(text) <= columns {
        return text.to_string();
    }
    let mut kept = String::new();
    for word in text.split(' ') {
        let separator = if kept.is_empty() { "" } else { " " };
        if width(&kept) + separator.len() + width(word) + width("…") > columns {
            break;
        }
        kept.push_str(separator);
        kept.push_str(word);
    }
    kept + "…"
}

/// Columns `text` takes on screen.
fn width(text: &str) -> usize {
    Span::raw(text).width()
}

/// How a run ended, short: `code 3`, `signal 9`, or nothing when it is not known.
fn ended_how(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (_, Some(signal)) => format!("signal {signal}"),
        (Some(code), None) => format!("code {code}"),
        (None, None) => String::new(),
    }
}

fn state_style(state: i32) -> Style {
    match pb::AgentState::try_from(state) {
        Ok(pb::AgentState::Running) => Style::new().fg(Color::Green),
        Ok(pb::AgentState::Failed | pb::AgentState::Lost) => Style::new().fg(Color::Red),
        Ok(
            pb::AgentState::Starting
            | pb::AgentState::Stopping
            | pb::AgentState::BackingOff
            | pb::AgentState::Paused,
        ) => Style::new().fg(Color::Yellow),
        _ => Style::new().fg(Color::Gray),
    }
}

fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

fn progress_bar(progress: f64) -> String {
    if progress <= 0.0 {
        return String::new();
    }
    let filled = ((progress.min(100.0) / 10.0).round()) as usize;
    format!(
        "{}{} {:>3.0}%",
        "█".repeat(filled),
        "░".repeat(10 - filled),
        progress
    )
}

/// What the agent and its sub-agents spent through the LLM gateway, in dollars; `!` once a
/// budget is reached.
fn spend(s: &pb::AgentStatus) -> String {
    let own = s
        .spend
        .as_ref()
        .and_then(|spend| spend.total)
        .map_or(0, |t| t.cost_micros);
    let tree = s.tree_spend.map_or(0, |t| t.cost_micros);
    if s.spend.is_none() && s.tree_spend.is_none() {
        return String::new();
    }
    let dollars = own.max(tree) as f64 / 1e6;
    let reached = if s.budget_reached.is_empty() { "" } else { "!" };
    match dollars < 1.0 {
        true => format!("${dollars:.4}{reached}"),
        false => format!("${dollars:.2}{reached}"),
    }
}
