// The dashboard's event stream, read off the page's main thread: a thousand agents sampled
// every second are a megabyte of events a second, and parsing them where the page draws made
// tasks of 60-120 ms. This worker reads /v1/events, drops what it has applied already, parses,
// and hands the page one batch every 100 ms: the latest status of each agent that changed,
// the latest figures of each agent sampled since (with `view=figures`, health samples carry
// only the figures a table shows, and come only when they changed), the samples for the charts
// and the events for the feed (health samples only while the page shows them).
"use strict";

const FLUSH_MS = 100;
let lastSeq = null; // the last sequence passed on: where a reconnection resumes
let retry = 500;
let statuses = new Map(); // agent id -> latest status in this batch (null: removed)
let figures = new Map();  // agent id -> latest figures sampled after that status
let samples = [];         // [agentId, timeMs, cpuPercent, memoryMb]
let feed = [];            // [time, kind, agentId, message, sequence]
let reset = false;
let noise = false;          // the page shows health samples in its feed

onmessage = (e) => { noise = e.data.noise; };

function send(message) { postMessage(message); }

setInterval(() => {
  if (!reset && !statuses.size && !figures.size && !feed.length && !samples.length) return;
  send({ reset, statuses: [...statuses], figures: [...figures], samples, feed });
  reset = false;
  statuses = new Map();
  figures = new Map();
  samples = [];
  feed = [];
}, FLUSH_MS);

function apply(kind, seq, data) {
  if (kind !== "SNAPSHOT" && lastSeq !== null && seq <= lastSeq) return; // seen already
  if (lastSeq === null || seq > lastSeq) lastSeq = seq;
  const ev = JSON.parse(data);
  if (kind === "HEALTH" && ev.status) figures.set(ev.agentId, ev.status);
  else if (kind === "REMOVED" || ev.status) {
    statuses.set(ev.agentId, kind === "REMOVED" ? null : ev.status);
    figures.delete(ev.agentId);
  }
  const status = ev.status;
  if (kind === "HEALTH" && status) {
    samples.push([ev.agentId, Date.parse(ev.time), status.cpuPercent, status.memoryMb]);
    if (noise) {
      const line = `cpu ${Number(status.cpuPercent).toFixed(1)}% · memory ${Number(status.memoryMb).toFixed(1)} MiB`;
      feed.push([ev.time, kind, ev.agentId, line, seq]);
    }
  } else if (kind === "PROGRESS" && status) {
    const line = `${Math.round(status.progress)}% ${status.progressMessage || ""}`;
    feed.push([ev.time, kind, ev.agentId, ev.message || line, seq]);
  } else if (kind !== "SNAPSHOT") {
    feed.push([ev.time, kind, ev.agentId, ev.message, seq]);
  }
}

// One `text/event-stream` connection until it ends; true if it ended normally.
async function follow() {
  // A resumption sends the standard `Last-Event-ID`; the daemon then skips the snapshot.
  const headers = lastSeq === null ? {} : { "Last-Event-ID": String(lastSeq) };
  const answer = await fetch("/v1/events?snapshot=true&view=figures", { headers, cache: "no-store" });
  if (answer.status === 410) {
    // The daemon no longer holds our position: start over from a snapshot.
    lastSeq = null;
    reset = true;
    return;
  }
  if (!answer.ok) throw new Error(`HTTP ${answer.status}`);
  if (lastSeq === null) { reset = true; statuses = new Map(); samples = []; }
  retry = 500;
  send({ link: true });
  const reader = answer.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let start = 0, end;
    while ((end = buffer.indexOf("\n\n", start)) >= 0) {
      let id = 0, kind = "", data = "";
      for (const line of buffer.slice(start, end).split("\n")) {
        if (line.startsWith("id: ")) id = Number(line.slice(4));
        else if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data = line.slice(6);
      }
      start = end + 2;
      // `event: error`: the daemon ended this watcher (it fell behind); resume.
      if (kind === "error") { console.warn("agentd ended the stream:", data); return; }
      if (kind.startsWith("EVENT_KIND_")) apply(kind.slice(11), id, data);
    }
    buffer = buffer.slice(start);
  }
}

(async () => {
  for (;;) {
    try { await follow(); } catch (_) { /* refused or cut: the daemon is away */ }
    send({ link: false });
    await new Promise((resolve) => setTimeout(resolve, retry));
    retry = Math.min(retry * 2, 5000);
  }
})();
