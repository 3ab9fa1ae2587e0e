//! `agentctl top`: a full-screen view of every agent, driven by WatchAgents (a snapshot, then
//! every event and sample), with sorting, filters, a tree mode, the selected agent's output
//! tail, and stop / kill with a confirmation. ratatui draws into a buffer and writes only the
//! cells that changed, so a redraw per sample does not flicker.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use agentd_proto::v1 as pb;
use anyhow::Context;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Row, Table, TableState};
use ratatui::{DefaultTerminal, Frame};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::Code;

use crate::client::Client;
use crate::names::{exit_text, health_name, is_live, state_name};
use crate::output::one_line;

/// Lines of the selected agent's output kept.
const OUTPUT_LINES: usize = 500;

#[derive(Clone, Copy, PartialEq, Eq)]
enum SortBy {
    Id,
    Cpu,
    Memory,
    Runtime,
    State,
}

impl SortBy {
    fn name(self) -> &'static str {
        match self {
            SortBy::Id => "id",
            SortBy::Cpu => "cpu",
            SortBy::Memory => "memory",
            SortBy::Runtime => "runtime",
            SortBy::State => "state",
        }
    }
}

/// Which agents show, by state.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StateFilter {
    All,
    Live,
    Ended,
    Failed,
}

impl StateFilter {
    fn next(self) -> StateFilter {
        match self {
            StateFilter::All => StateFilter::Live,
            StateFilter::Live => StateFilter::Ended,
            StateFilter::Ended => StateFilter::Failed,
            StateFilter::Failed => StateFilter::All,
        }
    }

    fn name(self) -> &'static str {
        match self {
            StateFilter::All => "all",
            StateFilter::Live => "live",
            StateFilter::Ended => "ended",
            StateFilter::Failed => "failed",
        }
    }

    fn keeps(self, status: &pb::AgentStatus) -> bool {
        let live = is_live(status.state);
        match self {
            StateFilter::All => true,
            StateFilter::Live => live,
            StateFilter::Ended => !live,
            StateFilter::Failed => matches!(
                pb::AgentState::try_from(status.state),
                Ok(pb::AgentState::Failed | pb::AgentState::Lost)
            ),
        }
    }
}

/// What the footer is doing: showing keys, asking to confirm, or taking a filter.
enum Prompt {
    Keys,
    Confirm { agent_id: String, force: bool },
    Filter(String),
    Message(String),
}

/// What the tasks tell the screen.
enum Update {
    Event(Box<pb::AgentEvent>),
    /// The event stream broke; it is being opened again.
    Disconnected(String),
    Summary(Box<pb::GetSummaryResponse>),
    Output(String, Vec<u8>),
    Stopped(String, Result<(), String>),
}

struct Top {
    agents: BTreeMap<String, (pb::AgentStatus, Instant)>,
    sort: SortBy,
    descending: bool,
    tree: bool,
    states: StateFilter,
    /// `key=value` matches a label; anything else a part of id, name, type or model.
    filter: String,
    /// The rows on screen, in order, with their tree depth.
    rows: Vec<(String, usize)>,
    table: TableState,
    selected: Option<String>,
    output: VecDeque<String>,
    /// A partial last line of output.
    partial: String,
    summary: Option<pb::GetSummaryResponse>,
    link: Result<(), String>,
    prompt: Prompt,
}

pub async fn top(client: Client, filter: Option<String>) -> anyhow::Result<u8> {
    let (updates_tx, mut updates) = mpsc::channel::<Update>(4096);
    let (keys_tx, mut keys) = mpsc::channel::<Event>(64);
    tokio::spawn(watch(client.clone(), updates_tx.clone()));
    tokio::spawn(summaries(client.clone(), updates_tx.clone()));
    // crossterm's reads block: one thread for them.
    std::thread::spawn(move || {
        while let Ok(event) = event::read() {
            if keys_tx.blocking_send(event).is_err() {
                return;
            }
        }
    });

    let mut terminal = ratatui::try_init().context("setting up the terminal")?;
    let mut app = Top {
        agents: BTreeMap::new(),
        sort: SortBy::Id,
        descending: false,
        tree: true,
        states: StateFilter::All,
        filter: filter.unwrap_or_default(),
        rows: Vec::new(),
        table: TableState::default(),
        selected: None,
        output: VecDeque::new(),
        partial: String::new(),
        summary: None,
        link: Err("connecting".into()),
        prompt: Prompt::Keys,
    };
    let result = app
        .run(&mut terminal, client, updates_tx, &mut updates, &mut keys)
        .await;
    ratatui::restore();
    result
}

impl Top {
    async fn run(
        &mut self,
        terminal: &mut DefaultTerminal,
        client: Client,
        updates_tx: mpsc::Sender<Update>,
        updates: &mut mpsc::Receiver<Update>,
        keys: &mut mpsc::Receiver<Event>,
    ) -> anyhow::Result<u8> {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut output_task: Option<JoinHandle<()>> = None;
        loop {
            self.order();
            terminal.draw(|frame| self.draw(frame)).context("drawing")?;
            tokio::select! {
                Some(update) = updates.recv() => {
                    self.update(update);
                    // Take what else is queued before drawing again: one frame per batch.
                    while let Ok(update) = updates.try_recv() {
                        self.update(update);
                    }
                }
                Some(event) = keys.recv() => {
                    let Event::Key(key) = event else { continue };
                    if key.kind != KeyEventKind::Press {
                        continue;
                    }
                    if self.key(key, &client, &updates_tx) {
                        if let Some(task) = output_task.take() {
                            task.abort();
                        }
                        return Ok(0);
                    }
                }
                _ = tick.tick() => {}
            }
            // Follow the output of whichever agent is selected now.
            let selected = self
                .table
                .selected()
                .and_then(|i| self.rows.get(i))
                .map(|r| r.0.clone());
            if selected != self.selected {
                if let Some(task) = output_task.take() {
                    task.abort();
                }
                self.output.clear();
                self.partial.clear();
                if let Some(agent_id) = &selected {
                    output_task = Some(tokio::spawn(follow_output(
                        client.clone(),
                        agent_id.clone(),
                        updates_tx.clone(),
                    )));
                }
                self.selected = selected;
            }
        }
    }

    fn update(&mut self, update: Update) {
        match update {
            Update::Event(event) => {
                self.link = Ok(());
                if event.kind == pb::EventKind::Removed as i32 {
                    self.agents.remove(&event.agent_id);
                } else if let Some(status) = event.status {
                    self.agents.insert(event.agent_id, (status, Instant::now()));
                }
            }
            Update::Disconnected(why) => self.link = Err(why),
            Update::Summary(summary) => self.summary = Some(*summary),
            Update::Output(agent_id, bytes) => {
                if self.selected.as_deref() != Some(&agent_id) {
                    return;
                }
                self.partial.push_str(&String::from_utf8_lossy(&bytes));
                while let Some(end) = self.partial.find('\n') {
                    let line: String = self.partial.drain(..=end).collect();
                    self.output
                        .push_back(one_line(line.trim_end_matches(['\n', '\r'])));
                    if self.output.len() > OUTPUT_LINES {
                        self.output.pop_front();
                    }
                }
            }
            Update::Stopped(agent_id, result) => {
                self.prompt = Prompt::Message(match result {
                    Ok(()) => format!("{agent_id} stopped"),
                    Err(error) => format!("{agent_id}: {error}"),
                });
            }
        }
    }

    /// Handles a key; true to quit.
    fn key(&mut self, key: KeyEvent, client: &Client, updates: &mpsc::Sender<Update>) -> bool {
        match &mut self.prompt {
            Prompt::Confirm { agent_id, force } => {
                if key.code == KeyCode::Char('y') {
                    tokio::spawn(stop(
                        client.clone(),
                        agent_id.clone(),
                        *force,
                        updates.clone(),
                    ));
                    self.prompt = Prompt::Message(format!(
                        "{} {agent_id}...",
                        if *force { "killing" } else { "stopping" }
                    ));
                } else {
                    self.prompt = Prompt::Keys;
                }
                return false;
            }
            Prompt::Filter(text) => {
                match key.code {
                    KeyCode::Enter => {
                        self.filter = std::mem::take(text);
                        self.prompt = Prompt::Keys;
                    }
                    KeyCode::Esc => self.prompt = Prompt::Keys,
                    KeyCode::Backspace => {
                        text.pop();
                    }
                    KeyCode::Char(c) => text.push(c),
                    _ => {}
                }
                return false;
            }
            Prompt::Keys | Prompt::Message(_) => self.prompt = Prompt::Keys,
        }
        let selected = self.table.selected().unwrap_or(0);
        let last = self.rows.len().saturating_sub(1);
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => return true,
            KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => return true,
            KeyCode::Down | KeyCode::Char('j') => self.table.select(Some((selected + 1).min(last))),
            KeyCode::Up => self.table.select(Some(selected.saturating_sub(1))),
            KeyCode::PageDown => self.table.select(Some((selected + 20).min(last))),
            KeyCode::PageUp => self.table.select(Some(selected.saturating_sub(20))),
            KeyCode::Home | KeyCode::Char('g') => self.table.select(Some(0)),
            KeyCode::End | KeyCode::Char('G') => self.table.select(Some(last)),
            KeyCode::Char('c') => self.sort_by(SortBy::Cpu),
            KeyCode::Char('m') => self.sort_by(SortBy::Memory),
            KeyCode::Char('r') => self.sort_by(SortBy::Runtime),
            KeyCode::Char('e') => self.sort_by(SortBy::State),
            KeyCode::Char('i') => self.sort_by(SortBy::Id),
            KeyCode::Char('t') => self.tree = !self.tree,
            KeyCode::Char('f') => self.states = self.states.next(),
            KeyCode::Char('/') => self.prompt = Prompt::Filter(self.filter.clone()),
            KeyCode::Char(verb @ ('s' | 'k')) => {
                if let Some((agent_id, _)) = self.rows.get(selected) {
                    self.prompt = Prompt::Confirm {
                        agent_id: agent_id.clone(),
                        force: verb == 'k',
                    };
                }
            }
            _ => {}
        }
        false
    }

    /// The same key again turns the order around; a new one starts with the biggest first
    /// (the id in order).
    fn sort_by(&mut self, sort: SortBy) {
        if self.sort == sort {
            self.descending = !self.descending;
        } else {
            self.sort = sort;
            self.descending = sort != SortBy::Id;
        }
    }

    fn compare(&self, a: &str, b: &str) -> std::cmp::Ordering {
        let (Some((x, x_at)), Some((y, y_at))) = (self.agents.get(a), self.agents.get(b)) else {
            return a.cmp(b);
        };
        let order = match self.sort {
            SortBy::Id => a.cmp(b),
            SortBy::Cpu => x.cpu_percent.total_cmp(&y.cpu_percent),
            SortBy::Memory => x.memory_mb.total_cmp(&y.memory_mb),
            SortBy::Runtime => runtime(x, *x_at).total_cmp(&runtime(y, *y_at)),
            SortBy::State => x.state.cmp(&y.state),
        };
        let order = if self.descending {
            order.reverse()
        } else {
            order
        };
        order.then_with(|| a.cmp(b))
    }

    fn keeps(&self, status: &pb::AgentStatus) -> bool {
        if !self.states.keeps(status) {
            return false;
        }
        let filter = self.filter.as_str();
        if filter.is_empty() {
            return true;
        }
        if let Some((key, value)) = filter.split_once('=') {
            return status.labels.get(key).is_some_and(|v| v == value);
        }
        [
            &status.agent_id,
            &status.agent_name,
            &status.agent_type,
            &status.model,
        ]
        .iter()
        .any(|field| field.contains(filter))
    }

    /// The rows in order: sorted, and in tree mode each agent under its parent (an agent
    /// whose parent is filtered out or unknown is a root).
    fn order(&mut self) {
        let shown: Vec<&String> = self
            .agents
            .iter()
            .filter(|(_, (status, _))| self.keeps(status))
            .map(|(id, _)| id)
            .collect();
        let mut rows = Vec::with_capacity(shown.len());
        if self.tree {
            let set: std::collections::HashSet<&str> = shown.iter().map(|s| s.as_str()).collect();
            let mut children: HashMap<&str, Vec<&str>> = HashMap::new();
            let mut roots = Vec::new();
            for id in &shown {
                let parent = self.agents[*id].0.parent_agent_id.as_str();
                if set.contains(parent) && parent != id.as_str() {
                    children.entry(parent).or_default().push(id);
                } else {
                    roots.push(id.as_str());
                }
            }
            let mut stack: Vec<(&str, usize)> = Vec::new();
            roots.sort_by(|a, b| self.compare(b, a));
            stack.extend(roots.into_iter().map(|id| (id, 0)));
            while let Some((id, depth)) = stack.pop() {
                rows.push((id.to_string(), depth));
                if let Some(kids) = children.get_mut(id) {
                    kids.sort_by(|a, b| self.compare(b, a));
                    stack.extend(kids.iter().map(|kid| (*kid, depth + 1)));
                }
            }
        } else {
            let mut flat = shown;
            flat.sort_by(|a, b| self.compare(a, b));
            rows.extend(flat.into_iter().map(|id| (id.clone(), 0)));
        }
        // Keep the same agent selected as rows move.
        let index = self
            .selected
            .as_ref()
            .and_then(|id| rows.iter().position(|(row, _)| row == id))
            .or_else(|| {
                (!rows.is_empty()).then(|| self.table.selected().unwrap_or(0).min(rows.len() - 1))
            });
        self.table.select(index);
        self.rows = rows;
    }

    fn draw(&mut self, frame: &mut Frame) {
        let [header, table, output, footer] = Layout::vertical([
            Constraint::Length(2),
            Constraint::Min(5),
            Constraint::Length(10),
            Constraint::Length(1),
        ])
        .areas(frame.area());
        self.draw_header(frame, header);
        self.draw_table(frame, table);
        self.draw_output(frame, output);
        self.draw_footer(frame, footer);
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
        let second = match &self.summary {
            Some(s) => {
                let host = s.host.unwrap_or_default();
                format!(
                    "load {:.0}/{:.0}   cpu {:.1}%  memory {:.1} MiB   host: {} CPUs, load {:.2}, {:.0} of {:.0} MiB free   sort {}{}{}  show {}{}",
                    s.total_load_percentage,
                    s.capacity,
                    s.total_cpu_percent,
                    s.total_memory_mb,
                    host.cpus,
                    host.load_average_1m,
                    host.memory_available_mb,
                    host.memory_total_mb,
                    self.sort.name(),
                    if self.descending { "↓" } else { "↑" },
                    if self.tree { " (tree)" } else { "" },
                    self.states.name(),
                    if self.filter.is_empty() {
                        String::new()
                    } else {
                        format!("  filter `{}`", self.filter)
                    },
                )
            }
            None => String::new(),
        };
        frame.render_widget(
            Paragraph::new(vec![Line::from(first), Line::from(second)]),
            area,
        );
    }

    fn draw_table(&mut self, frame: &mut Frame, area: Rect) {
        let header = Row::new([
            "AGENT", "STATE", "HEALTH", "CPU%", "MEM MiB", "THR", "RUNTIME", "PROGRESS", "RST",
            "SPEND", "COMMAND",
        ])
        .style(Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED));
        let rows = self.rows.iter().map(|(id, depth)| {
            let (s, at) = &self.agents[id];
            let live = is_live(s.state);
            let indent = match depth {
                0 => String::new(),
                d => format!("{}└ ", "  ".repeat(d - 1)),
            };
            let figures = |value: String| if live { value } else { String::new() };
            Row::new(vec![
                format!("{indent}{id}"),
                match live {
                    true => state_name(s.state),
                    false => format!(
                        "{} {}",
                        state_name(s.state),
                        exit_text(s.exit_code, s.exit_signal)
                    ),
                },
                figures(health_name(s.health)),
                figures(format!("{:.1}", s.cpu_percent)),
                match live {
                    true => format!("{:.1}", s.memory_mb),
                    false => format!("({:.1})", s.peak_memory_mb),
                },
                figures(s.num_threads.to_string()),
                duration(runtime(s, *at)),
                progress_bar(s.progress),
                s.restart_count.to_string(),
                spend(s),
                one_line(&s.cmdline.join(" ")),
            ])
            .style(state_style(s.state))
        });
        // As wide as the longest id with its indent, within reason.
        let id_width = self
            .rows
            .iter()
            .map(|(id, depth)| id.chars().count() + 2 * depth)
            .max()
            .unwrap_or(0)
            .clamp(8, 40);
        let widths = [
            Constraint::Length(id_width as u16),
            Constraint::Length(17),
            Constraint::Length(10),
            Constraint::Length(6),
            Constraint::Length(8),
            Constraint::Length(4),
            Constraint::Length(8),
            Constraint::Length(15),
            Constraint::Length(3),
            Constraint::Length(9),
            Constraint::Fill(1),
        ];
        let table = Table::new(rows, widths)
            .header(header)
            .row_highlight_style(
                Style::new()
                    .bg(Color::DarkGray)
                    .add_modifier(Modifier::BOLD),
            )
            .highlight_symbol("▶ ");
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

    fn draw_footer(&self, frame: &mut Frame, area: Rect) {
        let line = match &self.prompt {
            Prompt::Keys => Line::raw(
                "q quit  ↑↓ select  sort: c cpu  m memory  r runtime  e state  i id  t tree  f states  / filter  s stop  k kill",
            ),
            Prompt::Confirm { agent_id, force } => Line::styled(
                format!(
                    "{} {agent_id}? y to confirm, any other key to cancel",
                    if *force {
                        "Kill (SIGKILL its whole tree)"
                    } else {
                        "Stop (its ladder)"
                    }
                ),
                Style::new().fg(Color::Black).bg(Color::Yellow),
            ),
            Prompt::Filter(text) => Line::raw(format!(
                "filter (id, name, type, model, or KEY=VALUE): {text}▏"
            )),
            Prompt::Message(message) => Line::raw(message.as_str()),
        };
        frame.render_widget(Paragraph::new(line), area);
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

/// Seconds the run has lasted: as of the last event, plus the time since while it runs.
fn runtime(status: &pb::AgentStatus, received: Instant) -> f64 {
    let running = matches!(
        pb::AgentState::try_from(status.state),
        Ok(pb::AgentState::Running | pb::AgentState::Stopping)
    );
    status.runtime_seconds
        + if running {
            received.elapsed().as_secs_f64()
        } else {
            0.0
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

/// Every event, from a snapshot on; after a broken stream, from the last sequence seen (a
/// snapshot again if the daemon no longer holds it).
async fn watch(mut client: Client, updates: mpsc::Sender<Update>) {
    let mut after: Option<u64> = None;
    loop {
        let request = pb::WatchAgentsRequest {
            include_snapshot: after.is_none(),
            after_sequence: after,
            ..Default::default()
        };
        let why = match client.watch_agents(request).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(event)) => {
                            after = Some(after.map_or(event.sequence, |a| a.max(event.sequence)));
                            if updates.send(Update::Event(Box::new(event))).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => break "the event stream ended".to_string(),
                        Err(status) => break status.message().to_string(),
                    }
                }
            }
            Err(status) if status.code() == Code::OutOfRange => {
                after = None;
                continue;
            }
            Err(status) => status.message().to_string(),
        };
        if updates
            .send(Update::Disconnected(format!("reconnecting: {why}")))
            .await
            .is_err()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn summaries(mut client: Client, updates: mpsc::Sender<Update>) {
    loop {
        if let Ok(summary) = client.get_summary(pb::GetSummaryRequest {}).await
            && updates
                .send(Update::Summary(Box::new(summary.into_inner())))
                .await
                .is_err()
        {
            return;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn follow_output(mut client: Client, agent_id: String, updates: mpsc::Sender<Update>) {
    let request = pb::StreamLogsRequest {
        agent_id: agent_id.clone(),
        tail: 50,
        follow: true,
        ..Default::default()
    };
    let Ok(stream) = client.stream_logs(request).await else {
        return;
    };
    let mut stream = stream.into_inner();
    while let Ok(Some(chunk)) = stream.message().await {
        if updates
            .send(Update::Output(agent_id.clone(), chunk.data))
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn stop(mut client: Client, agent_id: String, force: bool, updates: mpsc::Sender<Update>) {
    let request = pb::CleanupRequest {
        agent_ids: vec![agent_id.clone()],
        force,
        ..Default::default()
    };
    let result = client
        .cleanup(request)
        .await
        .map(|_| ())
        .map_err(|status| status.message().to_string());
    let _ = updates.send(Update::Stopped(agent_id, result)).await;
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
