// Load driver for the WebSocket benchmark: the same driver against the
// bridge and against the legacy Node broker of the seeds.
// Usage: node bench.js <ws-url> <events> <rate per s, 0 = as fast as possible> <payload bytes>
// One publisher and one subscriber connection; prints one JSON line with
// delivered events/s and latency percentiles (publisher and subscriber share
// this process's clock).
import WebSocket from "ws";

const [, , url, eventsArg, rateArg, sizeArg] = process.argv;
const events = Number(eventsArg || 50000);
const rate = Number(rateArg || 0);
const filler = "x".repeat(Number(sizeArg || 100));

const open = (u) =>
  new Promise((res, rej) => {
    const ws = new WebSocket(u);
    ws.on("open", () => res(ws));
    ws.on("error", rej);
  });

const sub = await open(url);
const pub = await open(url);
const lat = [];
let first = 0;
let last = 0;
let probes = 0;
sub.on("message", (data) => {
  const m = JSON.parse(data.toString());
  if (!m.event) return;
  const p = m.event.payload;
  if (p.probe) {
    probes++;
    return;
  }
  const now = performance.now();
  if (!first) first = now;
  last = now;
  lat.push(now - p.t);
});
sub.send(JSON.stringify({ action: "subscribe", topic: "bench.event" }));
const send = (payload) => pub.send(JSON.stringify({ action: "publish", message: { type: "bench.event", payload } }));
while (probes === 0) {
  send({ probe: true });
  await new Promise((r) => setTimeout(r, 20));
}
const start = performance.now();
if (rate > 0) {
  // Paced in 1 ms slices so the offered load is steady.
  let sent = 0;
  while (sent < events) {
    const due = Math.min(events, Math.floor(((performance.now() - start) * rate) / 1000));
    while (sent < due) send({ seq: sent++, t: performance.now(), filler });
    await new Promise((r) => setTimeout(r, 1));
  }
} else {
  for (let i = 0; i < events; i++) {
    send({ seq: i, t: performance.now(), filler });
    if (i % 1000 === 999) await new Promise((r) => setImmediate(r));
  }
}
const deadline = performance.now() + 60000;
while (lat.length < events && performance.now() < deadline) await new Promise((r) => setTimeout(r, 5));
lat.sort((a, b) => a - b);
const pct = (q) => (lat.length ? lat[Math.min(lat.length - 1, Math.floor(q * lat.length))] : null);
const secs = (last - start) / 1000;
console.log(
  JSON.stringify({
    url,
    offered_rate: rate || "max",
    sent: events,
    delivered: lat.length,
    events_per_sec: Math.round(lat.length / secs),
    p50_ms: pct(0.5),
    p99_ms: pct(0.99),
    max_ms: lat[lat.length - 1],
  }),
);
process.exit(0);
