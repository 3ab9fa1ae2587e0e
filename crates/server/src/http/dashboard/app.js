// The agentd dashboard: /v1/events drives everything (read and parsed in a worker,
// events.js); the page renders at most once per animation frame and only the rows in view, so
// a thousand agents sampled every second stay cheap. No framework, no build step: the files
// are served as written.
"use strict";

const ROW = 26;          // px, as --row in style.css
const OVERSCAN = 8;      // rows drawn beyond the viewport
const SPARK = 60000;     // ms in a row's sparkline
const SPARK_POINTS = 120; // samples a row keeps for it
const CHART = 600;       // samples in the detail charts
const FEED = 200;        // events in the feed
const OUTPUT = 64 << 10; // characters of output kept in the detail pane
const LIVE = new Set(["STARTING", "RUNNING", "STOPPING", "BACKING_OFF", "PAUSED"]);
// Kinds that come once a second per agent: in the feed only when asked for.
const NOISE = new Set(["HEALTH", "PROGRESS"]);

const $ = (id) => document.getElementById(id);
const agents = new Map(); // id -> {s: status, at: ms received, spark: [[t, cpu, mem]], version}
let order = [];           // [{id, depth}] in tree order, filtered
let orderDirty = true;
let dirty = true;
let frame = 0;
let selected = null;      // {id, cpu: [[t, v]], mem: [[t, v]], requests: AbortController}
let pendingFeed = [];
let summary = null;

const short = (name) => (name || "").replace(/^(AGENT_STATE|HEALTH|EVENT_KIND|END_REASON)_/, "");
const num = (x) => (typeof x === "number" ? x : Number(x) || 0);
// An enum's value as words: `AGENT_STATE_BACKING_OFF` is "backing off".
const words = (name) => short(name).toLowerCase().replace(/_/g, " ");

function fmtMem(mb) {
  return mb >= 1024 ? (mb / 1024).toFixed(2) + " GiB" : mb.toFixed(1) + " MiB";
}

function fmtDollars(micros) {
  const dollars = micros / 1e6;
  return "$" + (dollars < 1 ? dollars.toFixed(4) : dollars.toFixed(2));
}

function fmtBudget(b) {
  const limits = [];
  if (num(b.tokens)) limits.push(`${num(b.tokens)} tokens`);
  if (num(b.costMicros)) limits.push(fmtDollars(num(b.costMicros)));
  if (num(b.requests)) limits.push(`${num(b.requests)} requests`);
  return limits.join(", ");
}

function fmtDuration(s) {
  s = Math.max(0, Math.floor(s));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return h ? `${h}h${String(m).padStart(2, "0")}m` : m ? `${m}m${String(sec).padStart(2, "0")}s` : `${sec}s`;
}

// A run's time goes on while it is paused.
function runtime(a) {
  const s = a.s;
  const running = ["RUNNING", "STOPPING", "PAUSED"].includes(short(s.state));
  return num(s.runtimeSeconds) + (running ? (performance.now() - a.at) / 1000 : 0);
}

// The daemon's clock, as its newest sample's time says (chart times come from it): charts
// end at its now, whatever the browser's clock says.
let skew = 0;
const daemonNow = () => Date.now() + skew;

// How a run ended, short enough for its column: `code 3`, `signal 9`, or why agentd ended it
// when the state does not say (`out of memory · signal 9`). Empty while it runs.
const SIGNALS = { 1: "SIGHUP", 2: "SIGINT", 6: "SIGABRT", 9: "SIGKILL", 11: "SIGSEGV", 15: "SIGTERM" };
const REASONS = { TIMED_OUT: "timed out", HEALTH_ACTION: "health check", START_FAILED: "start failed",
  OOM_KILLED: "out of memory", LOST: "lost", BUDGET: "budget" };

function ending(s) {
  const state = short(s.state);
  if (state === "BACKING_OFF") return { code: s.lastExitCode, signal: s.lastExitSignal };
  return LIVE.has(state) ? null : { code: s.exitCode, signal: s.exitSignal };
}

function exitText(s) {
  const end = ending(s);
  if (!end) return "";
  const how = end.signal != null ? `signal ${end.signal}` : end.code != null ? `code ${end.code}` : "";
  return [REASONS[short(s.endReason)], how].filter(Boolean).join(" · ");
}

function exitTitle(s) {
  const end = ending(s);
  if (!end) return "";
  const { code, signal } = end;
  return [`ended: ${words(s.endReason)}`, code != null ? `exit code ${code}` : "",
    signal != null ? `signal ${signal}${SIGNALS[signal] ? ` (${SIGNALS[signal]})` : ""}` : "", s.error]
    .filter(Boolean).join(" · ");
}

function schedule() {
  dirty = true;
  if (!frame) frame = requestAnimationFrame(render);
}

// ---- events ----------------------------------------------------------------------------------

// events.js reads /v1/events in a worker and sends a batch every 100 ms.
let worker = null;

function connect() {
  worker = new Worker("/dashboard/events.js");
  worker.onmessage = (e) => {
    const batch = e.data;
    if ("link" in batch) { setLink(batch.link); return; }
    if (batch.reset) { agents.clear(); orderDirty = true; }
    for (const [id, status] of batch.statuses) update(id, status);
    for (const [id, figures] of batch.figures) patch(id, figures);
    for (const [id, t, cpu, mem] of batch.samples) sample(id, t, num(cpu), num(mem));
    // Samples are live only (a resumption replays older events, never samples).
    const newest = batch.samples.length ? batch.samples[batch.samples.length - 1][1] : NaN;
    if (Number.isFinite(newest)) skew = newest - Date.now();
    pendingFeed.push(...batch.feed);
    schedule();
  };
}

// Health samples reach the feed only while they are shown: the worker leaves them out.
function showNoise() {
  const noise = $("feed-noise").checked;
  $("feed").classList.toggle("noise", noise);
  worker.postMessage({ noise });
}

function setLink(up) {
  const link = $("link");
  link.className = "link " + (up ? "up" : "down");
  link.textContent = up ? "live" : "reconnecting";
}

function update(id, status) {
  if (status === null) {
    agents.delete(id);
    orderDirty = true;
    return;
  }
  let a = agents.get(id);
  if (!a) {
    a = { spark: [], version: 0, history: false };
    agents.set(id, a);
    orderDirty = true;
  } else if (a.s.state !== status.state || a.s.parentAgentId !== status.parentAgentId) {
    orderDirty = true;
  }
  a.s = status;
  a.at = performance.now();
  a.version++;
}

// What a health sample carries (`view=figures`); JSON leaves out a field at its default.
const FIGURES = ["state", "processAlive", "processStatus", "cpuPercent", "memoryMb", "peakMemoryMb",
  "cpuSeconds", "runtimeSeconds", "numThreads", "numProcesses", "health", "healthReason",
  "progress", "progressMessage", "egress", "denials", "spend", "treeSpend", "budget", "budgetReached"];

function patch(id, figures) {
  const a = agents.get(id);
  if (!a) return;
  const s = { ...a.s };
  for (const field of FIGURES) {
    if (field in figures) s[field] = figures[field];
    else delete s[field];
  }
  update(id, s);
}

function sample(id, t, cpu, mem) {
  const a = agents.get(id);
  if (!a) return;
  push(a.spark, [t, cpu, mem], SPARK_POINTS);
  if (selected && selected.id === id) {
    push(selected.cpu, [t, cpu], CHART);
    push(selected.mem, [t, mem], CHART);
  }
}

function push(ring, item, max) {
  ring.push(item);
  if (ring.length > max) ring.splice(0, ring.length - max);
}

// ---- summary (capacity, host) ----------------------------------------------------------------

async function pollSummary() {
  try {
    const answer = await fetch("/v1/summary");
    if (answer.ok) { summary = await answer.json(); schedule(); }
    $("login").hidden = answer.status !== 401;
  } catch (_) { /* the event stream shows the link is down */ }
  setTimeout(pollSummary, 2000);
}

// ---- rendering -----------------------------------------------------------------------------

function render() {
  frame = 0;
  if (!dirty) return;
  dirty = false;
  if (orderDirty) buildOrder();
  renderHeader();
  renderRows();
  renderFeed();
  if (selected) renderDetail();
}

function buildOrder() {
  orderDirty = false;
  const filter = $("filter").value.trim().toLowerCase();
  const hideEnded = $("hide-ended").checked;
  const children = new Map();
  const roots = [];
  for (const [id, a] of agents) {
    const parent = a.s.parentAgentId;
    if (parent && agents.has(parent)) {
      if (!children.has(parent)) children.set(parent, []);
      children.get(parent).push(id);
    } else {
      roots.push(id);
    }
  }
  const matches = (a) => {
    if (hideEnded && !LIVE.has(short(a.s.state))) return false;
    if (!filter) return true;
    const s = a.s;
    return [s.agentId, s.agentName, s.agentType, s.model, short(s.state), short(s.health)]
      .some((field) => (field || "").toLowerCase().includes(filter));
  };
  order = [];
  const walk = (ids, depth) => {
    ids.sort();
    for (const id of ids) {
      if (matches(agents.get(id))) order.push({ id, depth });
      const kids = children.get(id);
      if (kids) walk(kids, depth + 1);
    }
  };
  walk(roots, 0);
  $("spacer").style.height = order.length * ROW + "px";
  $("shown").textContent = order.length === agents.size ? `${agents.size} agents`
    : `${order.length} of ${agents.size} agents`;
}

function renderHeader() {
  const counts = {};
  let unhealthy = 0;
  for (const a of agents.values()) {
    const state = short(a.s.state);
    counts[state] = (counts[state] || 0) + 1;
    const health = short(a.s.health);
    if (LIVE.has(state) && health && health !== "HEALTHY" && health !== "UNSPECIFIED") unhealthy++;
  }
  const parts = ["RUNNING", "STARTING", "STOPPING", "BACKING_OFF", "PAUSED", "COMPLETED", "FAILED",
    "KILLED", "LOST"].filter((s) => counts[s])
    .map((s) => `<span class="s-${s}"><b>${counts[s]}</b> ${s.toLowerCase().replace("_", " ")}</span>`);
  if (unhealthy) parts.push(`<span class="h-UNHEALTHY"><b>${unhealthy}</b> unhealthy</span>`);
  setHtml($("counts"), parts.join("") || "no agents");
  if (summary) {
    const load = num(summary.totalLoadPercentage), capacity = num(summary.capacity);
    setText($("load-text"), `load ${load.toFixed(0)} / ${capacity.toFixed(0)}`);
    $("load-bar").style.width = (capacity ? Math.min(100, (100 * load) / capacity) : 0) + "%";
    const host = summary.host || {};
    setText($("host"), `${host.cpus || "?"} CPUs · load ${num(host.loadAverage1m).toFixed(2)} · ` +
      `memory ${fmtMem(num(host.memoryAvailableMb))} free of ${fmtMem(num(host.memoryTotalMb))}`);
  }
}

const pool = []; // row elements, reused as the view scrolls

function rowElement(i) {
  if (!pool[i]) {
    const row = document.createElement("div");
    row.className = "row";
    row.innerHTML = `<span class="c-id"></span><span class="c-state"></span><span class="c-health"></span>` +
      `<span class="c-exit"></span><span class="c-pid num"></span><span class="c-cpu num"></span><span class="c-mem num"></span>` +
      `<span class="c-spark"><canvas class="spark" width="120" height="18"></canvas></span>` +
      `<span class="c-run num"></span><span class="c-prog prog"><span class="bar"><div></div></span><span></span></span>` +
      `<span class="c-restarts num"></span><span class="c-denied num"></span><span class="c-spend num"></span>`;
    row.addEventListener("click", () => select(row.dataset.id));
    $("visible").appendChild(row);
    pool[i] = row;
  }
  return pool[i];
}

function renderRows() {
  const view = $("rows");
  const first = Math.max(0, Math.floor(view.scrollTop / ROW) - OVERSCAN);
  // Live sparklines move on once a second, events or not.
  const second = String(Math.floor(daemonNow() / 1000));
  const last = Math.min(order.length, Math.ceil((view.scrollTop + view.clientHeight) / ROW) + OVERSCAN);
  let used = 0;
  for (let i = first; i < last; i++, used++) {
    const { id, depth } = order[i];
    const a = agents.get(id);
    const row = rowElement(used);
    row.hidden = false;
    row.style.transform = `translateY(${i * ROW}px)`;
    row.classList.toggle("selected", selected !== null && selected.id === id);
    const s = a.s, state = short(s.state), health = short(s.health);
    if (row.dataset.id === id && row.dataset.version === String(a.version)) {
      setText(row.children[8], fmtDuration(runtime(a)));
      if (row.dataset.second !== second && s.processAlive) {
        row.dataset.second = second;
        drawSpark(row.children[7].firstChild, a.spark, daemonNow());
      }
      continue;
    }
    row.dataset.id = id;
    row.dataset.version = a.version;
    row.dataset.second = second;
    const cells = row.children;
    const name = s.agentName && s.agentName !== id ? ` (${s.agentName})` : "";
    setHtml(cells[0], (depth ? `<span class="tree">${"  ".repeat(depth - 1)}└ </span>` : "") +
      escapeHtml(id + name));
    cells[0].title = (s.cmdline || []).join(" ");
    setText(cells[1], state.toLowerCase().replace("_", " "));
    cells[1].className = "c-state s-" + state;
    setText(cells[2], LIVE.has(state) ? health.toLowerCase().replace("_", " ") : "");
    cells[2].className = "c-health h-" + health;
    setText(cells[3], exitText(s));
    cells[3].title = exitTitle(s);
    setText(cells[4], LIVE.has(state) && s.pid ? String(s.pid) : "");
    setText(cells[5], LIVE.has(state) ? num(s.cpuPercent).toFixed(1) : "");
    setText(cells[6], LIVE.has(state) ? fmtMem(num(s.memoryMb)) : fmtMem(num(s.peakMemoryMb)));
    drawSpark(cells[7].firstChild, a.spark, chartEnd(s.processAlive, a.spark));
    setText(cells[8], fmtDuration(runtime(a)));
    const progress = num(s.progress);
    cells[9].firstChild.firstChild.style.width = Math.min(100, progress) + "%";
    setText(cells[9].lastChild, progress ? progress.toFixed(0) + "%" : "");
    cells[9].title = s.progressMessage || "";
    setText(cells[10], String(num(s.restartCount)));
    // A sandboxed agent's refusals: its proxy's, Landlock's and seccomp's.
    const denied = [num(s.egress && s.egress.denied), num(s.denials && s.denials.files),
      num(s.denials && s.denials.syscalls)];
    setText(cells[11], s.sandbox ? String(denied[0] + denied[1] + denied[2]) : "");
    cells[11].title = s.sandbox ? `connections ${denied[0]}, files ${denied[1]}, system calls ${denied[2]}` : "";
    cells[11].classList.toggle("alarm", denied[0] + denied[1] + denied[2] > 0);
    // What its tree spent through the LLM gateway (its own, for an agent with no children),
    // against its budget.
    const own = num(s.spend && s.spend.total && s.spend.total.costMicros);
    const tree = num(s.treeSpend && s.treeSpend.costMicros);
    setText(cells[12], s.treeSpend || s.spend ? fmtDollars(Math.max(own, tree)) : "");
    const budget = s.budget ? ` · budget ${fmtBudget(s.budget)}` : "";
    cells[12].title = s.treeSpend || s.spend || s.budget ?
      `own ${fmtDollars(own)} · with its sub-agents ${fmtDollars(tree)}${budget}` +
      (s.budgetReached ? ` · reached: ${s.budgetReached}` : "") : "";
    cells[12].classList.toggle("alarm", Boolean(s.budgetReached));
    if (!a.history) loadSpark(id, a);
  }
  for (let i = used; i < pool.length; i++) {
    pool[i].hidden = true;
    pool[i].dataset.id = "";
  }
}

// A row's sparkline starts from the daemon's history the first time the row is seen.
async function loadSpark(id, a) {
  a.history = true;
  const since = new Date(daemonNow() - SPARK).toISOString();
  try {
    const answer = await fetch(`/v1/agents/${encodeURIComponent(id)}/history?since=${since}`);
    if (!answer.ok) return;
    const history = await answer.json();
    const points = history.samples.map((p) => [Date.parse(p.time), num(p.cpuPercent), num(p.memoryMb)]);
    const newest = points.length ? points[points.length - 1][0] : 0;
    a.spark = points.concat(a.spark.filter((p) => p[0] > newest)).slice(-SPARK_POINTS);
    a.version++;
    schedule();
  } catch (_) { /* drawn from live samples alone */ }
}

// The minute up to `until` (now, for a live agent).
function drawSpark(canvas, points, until) {
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  // Each row on its own scale (at least 5%), so an agent's shape shows.
  const from = until - SPARK;
  const shown = points.filter((p, i) => i === points.length - 1 || points[i + 1][0] > from);
  const top = Math.max(5, ...shown.map((p) => p[1]));
  const x = (t) => ((Math.max(t, from) - from) / SPARK) * canvas.width;
  const y = (v) => canvas.height - 1 - (Math.min(v, top) / top) * (canvas.height - 2);
  g.strokeStyle = "#4cc38a";
  steps(g, shown, until, x, y);
}

// A sample's value holds until the next one: only samples whose figures changed are sent
// (`view=figures`), and the last one holds until `until`.
function steps(g, points, until, x, y) {
  if (!points.length) return;
  g.beginPath();
  g.moveTo(x(points[0][0]), y(points[0][1]));
  for (let i = 1; i < points.length; i++) {
    g.lineTo(x(points[i][0]), y(points[i - 1][1]));
    g.lineTo(x(points[i][0]), y(points[i][1]));
  }
  g.lineTo(x(Math.max(until, points[points.length - 1][0])), y(points[points.length - 1][1]));
  g.stroke();
}

// Where the charts of an agent whose process runs end: now; else at its last sample.
function chartEnd(alive, points) {
  return alive || !points.length ? daemonNow() : points[points.length - 1][0];
}

// The feed keeps the newest FEED lifecycle events and, apart, the newest FEED of the noisy
// kinds (hidden unless asked for), so a flood of progress never pushes a spawn or an exit out.
const feedCount = { life: 0, noise: 0 };

function renderFeed() {
  if (!pendingFeed.length) return;
  const feed = $("feed");
  const kept = { life: 0, noise: 0 }, items = [];
  for (let i = pendingFeed.length - 1; i >= 0; i--) {
    const [time, kind, id, message, seq] = pendingFeed[i];
    const sort = NOISE.has(kind) ? "noise" : "life";
    if (kept[sort] === FEED) continue;
    kept[sort]++;
    const li = document.createElement("li");
    li.dataset.seq = seq;
    li.className = sort;
    const when = time ? new Date(time).toLocaleTimeString() : "";
    li.innerHTML = `<time>${when}</time><span class="kind s-${kindClass(kind)}">${words(kind)}</span>` +
      `${escapeHtml(id)} ${escapeHtml(message || "")}`;
    items.push(li);
  }
  pendingFeed = [];
  feed.prepend(...items);
  feedCount.life += kept.life;
  feedCount.noise += kept.noise;
  for (let li = feed.lastElementChild; li && (feedCount.life > FEED || feedCount.noise > FEED);) {
    const newer = li.previousElementSibling;
    if (feedCount[li.className] > FEED) { li.remove(); feedCount[li.className]--; }
    li = newer;
  }
}

function kindClass(kind) {
  return { SPAWNED: "RUNNING", RESUMED: "RUNNING", RECOVERED: "RUNNING", ADOPTED: "RUNNING",
    FAILED: "FAILED", LOST: "FAILED", OOM_KILLED: "FAILED", TIMED_OUT: "FAILED",
    STALLED: "STOPPING", ALERT: "STOPPING", STOPPING: "STOPPING", RESTARTING: "STOPPING",
    PAUSED: "PAUSED" }[kind] || "COMPLETED";
}

// ---- the selected agent --------------------------------------------------------------------

async function select(id) {
  if (!id || !agents.has(id)) return;
  if (selected) selected.requests.abort();
  selected = { id, cpu: [], mem: [], requests: new AbortController(), version: -1, second: 0 };
  $("detail").hidden = false;
  $("d-title").textContent = id;
  $("d-output").textContent = "";
  $("d-error").hidden = true;
  for (const row of pool) row.dataset.version = ""; // redraw the highlight
  schedule();
  const mine = selected;
  followOutput(mine);
  try {
    const answer = await fetch(`/v1/agents/${encodeURIComponent(id)}/history`, { signal: mine.requests.signal });
    if (answer.ok && selected === mine) {
      const history = await answer.json();
      const cpu = history.samples.map((p) => [Date.parse(p.time), num(p.cpuPercent)]);
      const mem = history.samples.map((p) => [Date.parse(p.time), num(p.memoryMb)]);
      const newest = cpu.length ? cpu[cpu.length - 1][0] : 0;
      mine.cpu = cpu.concat(mine.cpu.filter((p) => p[0] > newest)).slice(-CHART);
      mine.mem = mem.concat(mine.mem.filter((p) => p[0] > newest)).slice(-CHART);
      mine.version = -1;
      schedule();
    }
  } catch (_) { /* the charts fill from live samples */ }
}

// The agent's output (both streams, as written), followed until another agent is selected.
async function followOutput(mine) {
  const pre = $("d-output");
  try {
    const answer = await fetch(`/v1/agents/${encodeURIComponent(mine.id)}/logs?follow=true&tail=200`,
      { signal: mine.requests.signal });
    if (!answer.ok) { pre.textContent = `(no output: HTTP ${answer.status})`; return; }
    const reader = answer.body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done || selected !== mine) return;
      const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      let text = pre.textContent + value;
      if (text.length > OUTPUT) text = text.slice(text.length - OUTPUT);
      pre.textContent = text;
      if (atBottom) pre.scrollTop = pre.scrollHeight;
    }
  } catch (_) { /* aborted, or the daemon went away */ }
}

function closeDetail() {
  if (selected) selected.requests.abort();
  selected = null;
  $("detail").hidden = true;
  for (const row of pool) row.dataset.version = "";
  schedule();
}

function renderDetail() {
  const a = agents.get(selected.id);
  if (!a) { closeDetail(); return; }
  const s = a.s, state = short(s.state), live = LIVE.has(state);
  const second = Math.floor(daemonNow() / 1000);
  if (selected.version === a.version) {
    // Live charts move on once a second, events or not.
    if (s.processAlive && selected.second !== second) drawCharts(true, second);
    return;
  }
  selected.version = a.version;
  setText($("d-facts"), [words(s.state), live ? words(s.health) : "", s.pid ? `pid ${s.pid}` : "",
    exitText(s), num(s.restartCount) ? `${num(s.restartCount)} restarts` : ""].filter(Boolean).join(" · "));
  $("d-facts").title = exitTitle(s);
  setText($("d-command"), (s.cmdline || []).map(shellQuote).join(" "));
  // Only what the daemon would do in this state.
  const shown = { pause: state === "RUNNING", resume: state === "PAUSED", restart: state !== "STARTING",
    stop: live, kill: live, remove: !live };
  for (const [name, show] of Object.entries(shown)) {
    const button = $("d-" + name);
    button.hidden = !show;
    button.disabled = Boolean(selected.busy);
  }
  drawCharts(Boolean(s.processAlive), second);
  setText($("d-cpu-now"), live ? num(s.cpuPercent).toFixed(1) : "");
  setText($("d-mem-now"), live ? num(s.memoryMb).toFixed(1) : `peak ${num(s.peakMemoryMb).toFixed(1)}`);
  const kids = [...agents.values()].filter((k) => k.s.parentAgentId === selected.id);
  const list = $("d-children");
  list.replaceChildren(...kids.map((k) => {
    const li = document.createElement("li");
    const link = document.createElement("a");
    link.textContent = k.s.agentId;
    link.addEventListener("click", () => select(k.s.agentId));
    li.append(link, ` ${words(k.s.state)}`);
    return li;
  }));
  if (!kids.length) list.innerHTML = "<li>none</li>";
  const rows = Object.entries(s).filter(([, value]) => !isEmpty(value)).map(([key, value]) =>
    `<tr><td>${escapeHtml(label(key))}</td><td>${escapeHtml(fieldText(key, value))}</td></tr>`);
  $("d-fields").innerHTML = rows.join("");
}

// Status fields in words: "process alive", not `processAlive`. Labels not listed here are the
// field's name split into words.
const LABELS = { agentId: "agent id", isZombie: "zombie", cpuPercent: "CPU %", memoryMb: "memory (MiB)",
  peakMemoryMb: "peak memory (MiB)", numThreads: "threads", numProcesses: "processes", cmdline: "command",
  pid: "PID", runtimeSeconds: "runtime", cpuSeconds: "CPU time (s)", loadPercentage: "declared load %",
  agentDir: "folder", restartCount: "restarts", costMicros: "cost", memoryMaxMb: "memory max (MiB)",
  memoryHighMb: "memory high (MiB)", pidsMax: "most processes", cpus: "CPUs", openFilesMax: "most open files",
  cpuMaxCores: "CPU max (cores)", bytesUp: "bytes up", bytesDown: "bytes down" };
const MAPS = new Set(["labels", "progressDetails", "models"]); // keys that are the user's own words
const ENUM = /^(AGENT_STATE|END_REASON|RESTART_POLICY|HEALTH|CONTAINMENT|NETWORK_MODE|ON_LIMIT)_/;

const label = (key) => LABELS[key] || key.replace(/[A-Z]/g, (c) => " " + c.toLowerCase());
const isEmpty = (value) => value === "" || value === null || value === undefined ||
  (typeof value === "object" && !Object.keys(value).length);

function fieldText(key, value) {
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (key === "cmdline") return value.map(shellQuote).join(" ");
  if (key === "costMicros") return fmtDollars(num(value));
  if (key === "runtimeSeconds") return fmtDuration(value);
  if (Array.isArray(value)) return value.join(", ");
  if (typeof value === "object") {
    return Object.entries(value).filter(([, v]) => !isEmpty(v))
      .map(([k, v]) => `${MAPS.has(key) ? k : label(k)} ${fieldText(k, v)}`).join(", ");
  }
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(2);
  if (ENUM.test(value)) return value.replace(ENUM, "").toLowerCase().replace(/_/g, " ");
  if (/^\d{4}-\d\d-\d\dT[\d:.]+Z$/.test(value)) return new Date(value).toLocaleString();
  return String(value);
}

function shellQuote(word) {
  return /^[\w@%+=:,./-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`;
}

function drawCharts(alive, second) {
  selected.second = second;
  drawChart($("d-cpu"), selected.cpu, 1, "#4cc38a", chartEnd(alive, selected.cpu));
  drawChart($("d-mem"), selected.mem, 1, "#5aa7f0", chartEnd(alive, selected.mem));
}

// A chart of [[time ms, value]] up to `until`: y from 0 to a round number above the data (at
// least `floor`), x over the samples held (at least a minute), both with labels. Drawn at the
// canvas's size on screen, so text is not stretched.
function drawChart(canvas, points, floor, color, until) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * ratio)) canvas.width = Math.round(w * ratio);
  if (canvas.height !== Math.round(h * ratio)) canvas.height = Math.round(h * ratio);
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, w, h);
  const left = 36, right = 8, top = 6, bottom = 16;
  const pw = w - left - right, ph = h - top - bottom;
  const max = roundUp(Math.max(floor, ...points.map((p) => p[1])));
  const t1 = until;
  const t0 = Math.min(points.length ? points[0][0] : t1, t1 - 60000);
  const x = (t) => left + ((t - t0) / (t1 - t0)) * pw, y = (v) => top + ph - (v / max) * ph;
  g.font = "10px ui-monospace, monospace";
  g.lineWidth = 1;
  g.strokeStyle = "#262c35";
  g.fillStyle = "#8a94a3";
  g.textAlign = "right";
  g.textBaseline = "middle";
  g.beginPath();
  for (const v of [0, max / 2, max]) {
    g.moveTo(left, Math.round(y(v)) + 0.5);
    g.lineTo(left + pw, Math.round(y(v)) + 0.5);
    g.fillText(String(Number(v.toPrecision(3))), left - 4, y(v));
  }
  const step = [5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600].map((s) => s * 1000)
    .find((s) => (t1 - t0) / s <= 5) || 7200000;
  g.textAlign = "center";
  g.textBaseline = "top";
  for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) {
    g.moveTo(Math.round(x(t)) + 0.5, top + ph);
    g.lineTo(Math.round(x(t)) + 0.5, top + ph + 3);
    const text = clock(t, step < 60000);
    const half = g.measureText(text).width / 2;
    g.fillText(text, Math.min(Math.max(x(t), left + half), w - half), top + ph + 4);
  }
  g.stroke();
  g.strokeStyle = color;
  steps(g, points, t1, x, y);
}

// The smallest of 1, 2, 2.5 and 5 times a power of ten that is at least `v`.
function roundUp(v) {
  const power = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 2.5, 5, 10].map((m) => m * power).find((n) => n >= v * (1 - 1e-9));
}

function clock(ms, seconds) {
  const d = new Date(ms), two = (n) => String(n).padStart(2, "0");
  return `${two(d.getHours())}:${two(d.getMinutes())}` + (seconds ? `:${two(d.getSeconds())}` : "");
}

// Every change the panel asks for goes the one way Stop always has: a JSON body, which the
// daemon requires of a change carried by the session cookie (with the page's own Origin, which
// the browser adds). The daemon's message shows in the panel when it refuses.
async function act(what, method, suffix, body, question) {
  const mine = selected;
  if (!mine || mine.busy || (question && !confirm(question))) return;
  const error = $("d-error");
  error.hidden = true;
  // What the panel still reads of an agent being removed would answer 404.
  if (method === "DELETE") mine.requests.abort();
  mine.busy = true;
  mine.version = -1;
  schedule();
  let failure = null;
  try {
    const answer = await fetch(`/v1/agents/${encodeURIComponent(mine.id)}${suffix}`, {
      method,
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!answer.ok) {
      failure = (await answer.json().catch(() => ({ message: `HTTP ${answer.status}` }))).message;
    }
  } catch (e) {
    failure = e.message;
  }
  mine.busy = false;
  mine.version = -1;
  schedule();
  if (failure && selected === mine) {
    error.textContent = `${what} ${mine.id}: ${failure}`;
    error.hidden = false;
  }
}

function stopSelected(force) {
  const verb = force ? "Kill" : "Stop";
  const how = force ? "SIGKILL to its whole process tree" : "its stop ladder (SIGTERM, then SIGKILL)";
  act(verb, "POST", ":stop", { force }, `${verb} agent ${selected.id}? agentd sends ${how}.`);
}

// ---- helpers -------------------------------------------------------------------------------

function setText(el, text) { if (el.textContent !== text) el.textContent = text; }
function setHtml(el, html) { if (el.__html !== html) { el.innerHTML = html; el.__html = html; } }
function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

// A daemon with --token-file: a token buys an HttpOnly session cookie, which the event
// stream and every other request then carry.
$("login").addEventListener("submit", async (e) => {
  e.preventDefault();
  const answer = await fetch("/v1/session", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ token: $("token").value }),
  });
  if (answer.ok) { location.reload(); return; }
  const error = await answer.json().catch(() => ({ message: `HTTP ${answer.status}` }));
  $("login-error").textContent = error.message;
});

$("rows").addEventListener("scroll", schedule, { passive: true });
window.addEventListener("resize", () => {
  if (selected) selected.version = -1; // charts are drawn at their size on screen
  schedule();
});
$("filter").addEventListener("input", () => { orderDirty = true; schedule(); });
$("hide-ended").addEventListener("change", () => { orderDirty = true; schedule(); });
$("feed-noise").addEventListener("change", showNoise);
$("d-close").addEventListener("click", closeDetail);
$("d-stop").addEventListener("click", () => stopSelected(false));
$("d-kill").addEventListener("click", () => stopSelected(true));
$("d-pause").addEventListener("click", () => act("Pause", "POST", ":pause", {}));
$("d-resume").addEventListener("click", () => act("Resume", "POST", ":resume", {}));
$("d-restart").addEventListener("click", () => {
  const running = ["RUNNING", "PAUSED", "STOPPING"].includes(short(agents.get(selected.id).s.state));
  act("Restart", "POST", ":restart", {}, running && `Restart agent ${selected.id}? agentd stops it with its ladder first.`);
});
$("d-remove").addEventListener("click", () => act("Remove", "DELETE", "", {},
  `Remove agent ${selected.id}? Its record, folder and output are deleted.`));
setInterval(schedule, 1000); // runtimes tick even when no event comes
connect();
showNoise(); // a reload keeps the box ticked
pollSummary();
