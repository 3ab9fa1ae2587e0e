//! `agentctl top`: a full-screen view of every agent, driven by WatchAgents (a snapshot, then
//! every event and sample), with sorting, filters, a tree mode, the selected agent's output
//! tail, and keys that stop, kill, restart, remove, pause and resume the selected agent (with
//! a confirmation for all but pause and resume). Live agents come before those that ended,
//! whatever the sort, unless it is by state. ratatui draws into a buffer and writes only the
//! cells that changed, so a redraw per sample does not flicker. What is drawn is in
//! `top/screen.rs`; the tasks that talk to agentd are in `top/tasks.rs`.

mod screen;
mod tasks;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use agentd_proto::v1 as pb;
use anyhow::Context;
use ratatui::DefaultTerminal;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::widgets::TableState;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::client::Client;
use crate::names::is_live;
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

/// What a key asks of the selected agent.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    /// With its ladder.
    Stop,
    /// SIGKILL to its whole tree.
    Kill,
    Restart,
    Remove,
    Pause,
    Resume,
}

impl Action {
    /// `y` is asked first for all that end a run or delete an agent.
    fn confirms(self) -> bool {
        !matches!(self, Action::Pause | Action::Resume)
    }

    fn verb(self) -> &'static str {
        match self {
            Action::Stop => "stop",
            Action::Kill => "kill",
            Action::Restart => "restart",
            Action::Remove => "remove",
            Action::Pause => "pause",
            Action::Resume => "resume",
        }
    }

    /// How the confirmation asks, before the agent's id.
    fn question(self) -> &'static str {
        match self {
            Action::Stop => "Stop (its ladder)",
            Action::Kill => "Kill (SIGKILL its whole tree)",
            Action::Restart => "Restart",
            Action::Remove => "Remove (its record, folder and output)",
            Action::Pause => "Pause",
            Action::Resume => "Resume",
        }
    }

    fn doing(self) -> &'static str {
        match self {
            Action::Stop => "stopping",
            Action::Kill => "killing",
            Action::Restart => "restarting",
            Action::Remove => "removing",
            Action::Pause => "pausing",
            Action::Resume => "resuming",
        }
    }

    fn done(self) -> &'static str {
        match self {
            Action::Stop => "stopped",
            Action::Kill => "killed",
            Action::Restart => "restarted",
            Action::Remove => "removed",
            Action::Pause => "paused",
            Action::Resume => "resumed",
        }
    }
}

/// What the footer is doing: showing keys, asking to confirm, taking a filter, or saying how
/// the last action went.
enum Prompt {
    Keys,
    Confirm {
        agent_id: String,
        action: Action,
    },
    Filter(String),
    Message(String),
    /// The server's refusal of an action.
    Failure(String),
}

/// What the tasks tell the screen.
enum Update {
    Event(Box<pb::AgentEvent>),
    /// The event stream broke; it is being opened again.
    Disconnected(String),
    Summary(Box<pb::GetSummaryResponse>),
    Output(String, Vec<u8>),
    /// An action on an agent ended: the server's error message if it failed.
    Done(String, Action, Result<(), String>),
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
    tokio::spawn(tasks::watch(client.clone(), updates_tx.clone()));
    tokio::spawn(tasks::summaries(client.clone(), updates_tx.clone()));
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
        sort: SortBy::Cpu,
        descending: true,
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
                    output_task = Some(tokio::spawn(tasks::follow_output(
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
                    let status = match self.agents.remove(&event.agent_id) {
                        // A HEALTH sample carries only the figures (`EVENT_VIEW_FIGURES`).
                        Some((held, _)) if event.kind == pb::EventKind::Health as i32 => {
                            held.with_figures(status)
                        }
                        _ => status,
                    };
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
            Update::Done(agent_id, action, result) => {
                self.prompt = match result {
                    Ok(()) => Prompt::Message(format!("{agent_id} {}", action.done())),
                    Err(error) => {
                        Prompt::Failure(format!("cannot {} {agent_id}: {error}", action.verb()))
                    }
                };
            }
        }
    }

    /// Handles a key; true to quit.
    fn key(&mut self, key: KeyEvent, client: &Client, updates: &mpsc::Sender<Update>) -> bool {
        match &mut self.prompt {
            Prompt::Confirm { agent_id, action } => {
                self.prompt = match key.code {
                    KeyCode::Char('y') => act(client, std::mem::take(agent_id), *action, updates),
                    _ => Prompt::Keys,
                };
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
            Prompt::Keys | Prompt::Message(_) | Prompt::Failure(_) => self.prompt = Prompt::Keys,
        }
        let selected = self.table.selected().unwrap_or(0);
        let last = self.rows.len().saturating_sub(1);
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => return true,
            KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => return true,
            KeyCode::Down | KeyCode::Char('j') => self.table.select(Some((selected + 1).min(last))),
            KeyCode::Up | KeyCode::Char('k') => self.table.select(Some(selected.saturating_sub(1))),
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
            _ => {
                let Some((agent_id, _)) = self.rows.get(selected) else {
                    return false;
                };
                let paused = self
                    .agents
                    .get(agent_id)
                    .is_some_and(|(s, _)| s.state == pb::AgentState::Paused as i32);
                let action = match key.code {
                    KeyCode::Char('s') => Action::Stop,
                    KeyCode::Char('K') => Action::Kill,
                    KeyCode::Char('R') => Action::Restart,
                    KeyCode::Char('d') | KeyCode::Delete => Action::Remove,
                    KeyCode::Char('p') if paused => Action::Resume,
                    KeyCode::Char('p') => Action::Pause,
                    _ => return false,
                };
                let agent_id = agent_id.clone();
                self.prompt = match action.confirms() {
                    true => Prompt::Confirm { agent_id, action },
                    false => act(client, agent_id, action, updates),
                };
            }
        }
        false
    }

    /// The same key again turns the order around; a new one starts with the biggest first
    /// (the id in order, the states from running to completed).
    fn sort_by(&mut self, sort: SortBy) {
        if self.sort == sort {
            self.descending = !self.descending;
        } else {
            self.sort = sort;
            self.descending = !matches!(sort, SortBy::Id | SortBy::State);
        }
    }

    /// Agents in `live` (in tree mode, those with a live agent in their subtree) come first,
    /// in either direction, unless the sort is by state: then the user asked for an order of
    /// states, which puts the live ones first unless turned around.
    fn compare(&self, a: &str, b: &str, live: &HashSet<&str>) -> std::cmp::Ordering {
        let (Some((x, x_at)), Some((y, y_at))) = (self.agents.get(a), self.agents.get(b)) else {
            return a.cmp(b);
        };
        let group = match self.sort {
            SortBy::State => std::cmp::Ordering::Equal,
            _ => live.contains(b).cmp(&live.contains(a)),
        };
        let order = match self.sort {
            SortBy::Id => a.cmp(b),
            SortBy::Cpu => x.cpu_percent.total_cmp(&y.cpu_percent),
            SortBy::Memory => memory(x).total_cmp(&memory(y)),
            SortBy::Runtime => runtime(x, *x_at).total_cmp(&runtime(y, *y_at)),
            SortBy::State => state_rank(x.state).cmp(&state_rank(y.state)),
        };
        let order = if self.descending {
            order.reverse()
        } else {
            order
        };
        group.then(order).then_with(|| a.cmp(b))
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
        let set: HashSet<&str> = shown.iter().map(|s| s.as_str()).collect();
        // In tree mode, an agent's parent when it is shown too.
        let parent = |id: &str| {
            let parent = self.agents[id].0.parent_agent_id.as_str();
            (self.tree && set.contains(parent) && parent != id).then_some(parent)
        };
        // The live agents, and in tree mode their ancestors: a live child is not buried
        // under a parent that ended.
        let mut live: HashSet<&str> = HashSet::new();
        for id in &shown {
            let mut next = is_live(self.agents[*id].0.state).then_some(id.as_str());
            while let Some(id) = next {
                next = if live.insert(id) { parent(id) } else { None };
            }
        }
        let mut rows = Vec::with_capacity(shown.len());
        let mut children: HashMap<&str, Vec<&str>> = HashMap::new();
        let mut roots = Vec::new();
        for id in &shown {
            match parent(id) {
                Some(parent) => children.entry(parent).or_default().push(id),
                None => roots.push(id.as_str()),
            }
        }
        let mut stack: Vec<(&str, usize)> = Vec::new();
        roots.sort_by(|a, b| self.compare(b, a, &live));
        stack.extend(roots.into_iter().map(|id| (id, 0)));
        while let Some((id, depth)) = stack.pop() {
            rows.push((id.to_string(), depth));
            if let Some(kids) = children.get_mut(id) {
                kids.sort_by(|a, b| self.compare(b, a, &live));
                stack.extend(kids.iter().map(|kid| (*kid, depth + 1)));
            }
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
}

/// Starts `action` on the agent; what the footer says meanwhile.
fn act(
    client: &Client,
    agent_id: String,
    action: Action,
    updates: &mpsc::Sender<Update>,
) -> Prompt {
    let message = format!("{} {agent_id}...", action.doing());
    tokio::spawn(tasks::act(
        client.clone(),
        agent_id,
        action,
        updates.clone(),
    ));
    Prompt::Message(message)
}

/// The memory an agent's row shows: what it holds while live, the most its run held after.
fn memory(status: &pb::AgentStatus) -> f64 {
    match is_live(status.state) {
        true => status.memory_mb,
        false => status.peak_memory_mb,
    }
}

/// The order of states when sorting by state: running first, completed last.
fn state_rank(state: i32) -> u8 {
    use pb::AgentState::*;
    match pb::AgentState::try_from(state) {
        Ok(Running) => 0,
        Ok(Starting) => 1,
        Ok(Paused) => 2,
        Ok(BackingOff) => 3,
        Ok(Stopping) => 4,
        Ok(Failed) => 5,
        Ok(Lost) => 6,
        Ok(TimedOut) => 7,
        Ok(Killed) => 8,
        Ok(Completed) => 9,
        Ok(Unspecified) | Err(_) => 10,
    }
}

/// Seconds the run has lasted: as of the last event, plus the time since while it runs
/// (paused too: its time goes on).
fn runtime(status: &pb::AgentStatus, received: Instant) -> f64 {
    let running = matches!(
        pb::AgentState::try_from(status.state),
        Ok(pb::AgentState::Running | pb::AgentState::Stopping | pb::AgentState::Paused)
    );
    status.runtime_seconds
        + if running {
            received.elapsed().as_secs_f64()
        } else {
            0.0
        }
}
