// A service for the reaper tests: POSTs enriched heartbeats (the legacy fleet's
// payload: pid, name, connected, queue, inflight, last_progress_ts,
// avg_job_ms) to a legacy heartbeat URL every N ms, in one of four modes:
//
//   healthy       connected, nothing queued, progress now
//   blocked       beats a few times, then spins in `while (true) {}` forever
//   disconnected  says connected: false
//   stalled       queue 3, inflight 1, last_progress_ts fixed at the first beat
//
// Usage: node reap_target.js <mode> <url> <name> [interval-ms] [beats-before-block]
// Prints `ready {"pid","first_sent_ms","progress_ts"}` after the first 200,
// and, in blocked mode, `blocking {"last_sent_ms"}` right before it spins
// (last_sent_ms: when the last beat was sent, which the server saw later).
import { writeSync } from "node:fs";

const [mode, url, name = `target-${process.argv[2]}`] = process.argv.slice(2);
const interval = Number(process.argv[5] || 500);
const beatsBeforeBlock = Number(process.argv[6] || 3);
if (!["healthy", "blocked", "disconnected", "stalled"].includes(mode) || !url) {
  console.error("usage: node reap_target.js healthy|blocked|disconnected|stalled <url> [name] [interval-ms]");
  process.exit(2);
}

const say = (line) => writeSync(1, line + "\n");
let firstSentMs = null;
let progressTs = null; // stalled: fixed at the first beat, never moves
let ok = 0;

function payload(now) {
  const body = { pid: process.pid, name, avg_job_ms: 12 };
  switch (mode) {
    case "disconnected":
      return { ...body, connected: false, queue: 0, inflight: 0, last_progress_ts: now };
    case "stalled":
      return { ...body, connected: true, queue: 3, inflight: 1, last_progress_ts: progressTs };
    default:
      return { ...body, connected: true, queue: 0, inflight: 0, last_progress_ts: now };
  }
}

async function beat() {
  const sent = Date.now();
  if (firstSentMs === null) {
    firstSentMs = sent;
    progressTs = sent;
  }
  let res;
  try {
    res = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(payload(sent)),
    });
    await res.text();
  } catch (e) {
    console.error(`beat failed: ${e}`);
    return;
  }
  if (res.status !== 200) {
    console.error(`beat got ${res.status}`);
    return;
  }
  ok += 1;
  if (ok === 1) {
    say(`ready ${JSON.stringify({ pid: process.pid, first_sent_ms: firstSentMs, progress_ts: progressTs })}`);
  }
  if (mode === "blocked" && ok >= beatsBeforeBlock) {
    say(`blocking ${JSON.stringify({ last_sent_ms: sent })}`);
    // A synchronous busy loop: no timer, no beat, ever again.
    // eslint-disable-next-line no-constant-condition
    while (true) {}
  }
}

// Beats one after another (never two in flight), every `interval` ms.
async function loop() {
  for (;;) {
    const started = Date.now();
    await beat();
    const wait = Math.max(0, interval - (Date.now() - started));
    await new Promise((r) => setTimeout(r, wait));
  }
}
loop();
