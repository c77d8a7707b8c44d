// Load driver for the WebSocket bridge benchmark: the same driver against
// the bridge, against the legacy Node broker, and against an
// MQTT broker directly (the same envelopes published and received by MQTT
// clients, to show what the bridge adds).
//
//   node bench.js --url ws://127.0.0.1:7000 [--events 100000] [--rate 0]
//                 [--size 100] [--receivers 1] [--senders 1] [--pids 123,456]
//   node bench.js --mqtt 127.0.0.1:1883 --package default [...same]
//   node bench.js --url ws://… --send-mqtt 127.0.0.1:1883 --package default
//   node bench.js --url ws://… --queue bench.q [--credits 256] [...same]
//
// `--mqtt`: sender and receivers are MQTT clients of the broker (direct
// MQTT). `--send-mqtt`: the sender is an MQTT device and the receivers are
// WebSocket clients of the bridge (the MQTT → WebSocket path).
// The sender and each receiver are separate processes (forked from this
// one), so a driver process saturating its core shows in its CPU figure
// instead of silently capping the broker's. Latency is measured on
// CLOCK_MONOTONIC (process.hrtime), which every process on the machine
// shares. `--rate 0` sends as fast as the broker takes it, in batches of
// 100 frames per socket write (the sender holds at most 1 MiB unsent); a
// positive rate paces the sender in 1 ms slices, one write per frame.
// `--senders N` splits the events among N sender processes, each on its
// own connection (receivers still expect every event).
// `--pids` are the broker's processes, whose CPU time (utime+stime from
// /proc) is measured over the run. Prints one JSON line.
import WebSocket from "ws";
import net from "node:net";
import fs from "node:fs";
import { fork } from "node:child_process";
import { fileURLToPath } from "node:url";

const opts = parseArgs(process.argv.slice(2));
const EVENT_TYPE = "bench.event";
const SEND_BUFFER = 1 << 20;
const SEND_BATCH = 100;

function parseArgs(argv) {
  const o = { events: 100000, rate: 0, size: 100, receivers: 1, senders: 1, credits: 256, package: "default" };
  for (let i = 0; i < argv.length; i += 2) o[argv[i].replace(/^--/, "")] = argv[i + 1];
  for (const k of ["events", "rate", "size", "receivers", "senders", "credits"]) o[k] = Number(o[k]);
  // A sender's own share of the events and of the rate (set by the coordinator).
  o.share = o.share === undefined ? o.events : Number(o.share);
  o.shareRate = o.rate / o.senders;
  return o;
}

const hr = () => Number(process.hrtime.bigint()) / 1e6;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const cpuMs = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1000;
};

// A minimal MQTT 3.1.1 client, QoS 0 only: enough to publish and receive
// the benchmark's events without pulling an MQTT library into the tests.
class MqttLite {
  constructor(hostPort, onPublish) {
    const [host, port] = hostPort.split(":");
    this.onPublish = onPublish;
    this.buf = Buffer.alloc(0);
    this.waiters = [];
    this.socket = net.connect(Number(port), host);
    this.socket.setNoDelay(true);
    this.socket.on("data", (d) => this.feed(d));
  }

  static async open(hostPort, onPublish) {
    const c = new MqttLite(hostPort, onPublish);
    await new Promise((res, rej) => {
      c.socket.once("connect", res);
      c.socket.once("error", rej);
    });
    const id = Buffer.from(`bench-${process.pid}-${Math.random().toString(16).slice(2)}`);
    const body = Buffer.concat([
      Buffer.from([0, 4, 0x4d, 0x51, 0x54, 0x54, 4, 0x02, 0, 60]),
      u16(id.length),
      id,
    ]);
    c.socket.write(packet(0x10, body));
    await c.expect(0x20);
    return c;
  }

  expect(type) {
    return new Promise((res) => this.waiters.push({ type, res }));
  }

  async subscribe(topic) {
    const t = Buffer.from(topic);
    this.socket.write(packet(0x82, Buffer.concat([u16(1), u16(t.length), t, Buffer.from([0])])));
    await this.expect(0x90);
  }

  // Returns false when the socket's buffer is full (wait for "drain").
  publish(topic, payload) {
    const t = Buffer.from(topic);
    return this.socket.write(packet(0x30, Buffer.concat([u16(t.length), t, Buffer.from(payload)])));
  }

  feed(data) {
    this.buf = this.buf.length ? Buffer.concat([this.buf, data]) : data;
    let off = 0;
    for (;;) {
      if (this.buf.length - off < 2) break;
      let len = 0;
      let mul = 1;
      let i = off + 1;
      let complete = false;
      while (i < this.buf.length) {
        const b = this.buf[i++];
        len += (b & 0x7f) * mul;
        mul *= 128;
        if (!(b & 0x80)) {
          complete = true;
          break;
        }
      }
      if (!complete || this.buf.length - i < len) break;
      const type = this.buf[off] & 0xf0;
      const body = this.buf.subarray(i, i + len);
      off = i + len;
      if (type === 0x30) {
        const tl = body.readUInt16BE(0);
        this.onPublish(body.subarray(2 + tl));
      } else {
        const w = this.waiters.findIndex((x) => x.type === type);
        if (w >= 0) this.waiters.splice(w, 1)[0].res(body);
      }
    }
    this.buf = off === this.buf.length ? Buffer.alloc(0) : this.buf.subarray(off);
  }
}

function u16(n) {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n);
  return b;
}

function packet(first, body) {
  const len = [];
  let n = body.length;
  do {
    let b = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) b |= 0x80;
    len.push(b);
  } while (n > 0);
  return Buffer.concat([Buffer.from([first, ...len]), body]);
}

const eventTopic = () => `axion/${opts.package}/event/${EVENT_TYPE.replaceAll(".", "/")}`;

// One connection that can send events: a legacy `publish` frame, or over
// MQTT the envelope the bridge itself would publish.
async function openSender() {
  const mqtt = opts.mqtt || opts["send-mqtt"];
  if (mqtt) {
    const c = await MqttLite.open(mqtt, () => {});
    const topic = eventTopic();
    const source = `bench-${process.pid}`;
    return {
      send: (payload) =>
        c.publish(
          topic,
          JSON.stringify({ type: EVENT_TYPE, source, payload, timestamp: new Date().toISOString() }),
        ),
      backlog: () => c.socket.writableLength,
      socket: c.socket,
    };
  }
  const ws = await openWs();
  if (opts.queue) {
    // Axion confirms each task once it is on disk; the legacy broker never does.
    const s = { confirmed: 0 };
    ws.on("message", (data) => {
      if (JSON.parse(data).enqueued) s.confirmed++;
    });
    return Object.assign(s, {
      send: (task) => ws.send(JSON.stringify({ action: "enqueue", queue: opts.queue, task })),
      backlog: () => ws.bufferedAmount,
      socket: ws._socket,
    });
  }
  return {
    send: (payload) => ws.send(JSON.stringify({ action: "publish", message: { type: EVENT_TYPE, payload } })),
    backlog: () => ws.bufferedAmount,
    socket: ws._socket,
  };
}

function openWs() {
  return new Promise((res, rej) => {
    const ws = new WebSocket(opts.url);
    ws.on("open", () => res(ws));
    ws.on("error", rej);
  });
}

async function receiver() {
  const lat = new Float64Array(opts.events);
  let count = 0;
  let first = 0;
  let last = 0;
  let probed = false;
  let cpu0 = 0;
  const seen = new Set();
  let duplicates = 0;
  const report = () =>
    process.send({
      kind: "result",
      count,
      duplicates,
      first,
      last,
      cpu: cpuMs() - cpu0,
      lat: lat.subarray(0, count),
    });
  const onEnvelope = (e) => {
    const p = e.payload;
    if (p.probe) {
      if (!probed) {
        probed = true;
        cpu0 = cpuMs();
        process.send({ kind: "probed" });
      }
      return;
    }
    const now = hr();
    if (!first) first = now;
    last = now;
    if (count < lat.length) lat[count++] = now - p.t;
    if (count === opts.events) report();
  };
  if (opts.mqtt) {
    const c = await MqttLite.open(opts.mqtt, (payload) => onEnvelope(JSON.parse(payload)));
    await c.subscribe(eventTopic());
  } else if (opts.queue) {
    const ws = await openWs();
    const ready = JSON.stringify({ action: "ready", queue: opts.queue });
    ws.on("message", (data) => {
      const { task } = JSON.parse(data);
      if (!task) return;
      ws.send(JSON.stringify({ action: "ack", taskId: task.id }));
      ws.send(ready);
      if (seen.has(task.id)) duplicates++;
      else {
        seen.add(task.id);
        onEnvelope(task);
      }
    });
    for (let i = 0; i < opts.credits; i++) ws.send(ready);
  } else {
    const ws = await openWs();
    ws.on("message", (data) => {
      const m = JSON.parse(data);
      if (m.event) onEnvelope(m.event);
    });
    ws.send(JSON.stringify({ action: "subscribe", topic: EVENT_TYPE }));
  }
  process.on("message", (m) => {
    if (m.kind === "report") report();
    if (m.kind === "exit") process.exit(0);
  });
  process.send({ kind: "ready" });
}

async function sender() {
  const s = await openSender();
  let probing = true;
  process.on("message", async (m) => {
    if (m.kind === "go") {
      probing = false;
      await run(s);
    }
    if (m.kind === "report") process.send({ kind: "confirmed", confirmed: s.confirmed ?? null });
    if (m.kind === "exit") process.exit(0);
  });
  process.send({ kind: "ready" });
  while (probing) {
    s.send({ probe: true });
    await sleep(20);
  }
}

async function run(s) {
  const filler = "x".repeat(opts.size);
  const cpu0 = cpuMs();
  const start = hr();
  process.send({ kind: "started", start });
  let sent = 0;
  if (opts.rate > 0) {
    // One write per frame, as a real client sends them.
    while (sent < opts.share) {
      const due = Math.min(opts.share, Math.floor(((hr() - start) * opts.shareRate) / 1000));
      while (sent < due) s.send({ seq: sent++, t: hr(), filler });
      await sleep(1);
    }
  } else {
    // Flat out, frames sent in one go leave in one write (the socket is
    // corked around them), so the driver's own system calls do not eat the
    // CPU the broker needs; each frame is still its own WebSocket or MQTT
    // message.
    const batch = (n) => {
      s.socket.cork();
      for (let i = 0; i < n; i++) s.send({ seq: sent++, t: hr(), filler });
      s.socket.uncork();
    };
    while (sent < opts.share) {
      // Sleeping, not spinning: a spinning driver would steal the CPU
      // the broker needs on a small machine.
      while (s.backlog() > SEND_BUFFER) await sleep(1);
      batch(Math.min(SEND_BATCH, opts.share - sent));
      await new Promise((r) => setImmediate(r));
    }
  }
  while (s.backlog() > 0) await sleep(1);
  process.send({ kind: "sent", end: hr(), cpu: cpuMs() - cpu0 });
}

// utime+stime of a process, in ms.
function procCpuMs(pid) {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
  const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return ((Number(f[11]) + Number(f[12])) * 1000) / 100;
}

async function coordinator() {
  const self = fileURLToPath(import.meta.url);
  const args = process.argv.slice(2);
  const spawn = (role, extra = []) => {
    const child = fork(self, [...args, "--role", role, ...extra], { serialization: "advanced" });
    const inbox = [];
    const wake = [];
    child.on("message", (m) => {
      inbox.push(m);
      while (wake.length) wake.shift()();
    });
    child.on("exit", (code) => {
      if (code) {
        console.error(`${role} exited with ${code}`);
        process.exit(1);
      }
    });
    const next = async (kind, ms = 30000) => {
      const end = Date.now() + ms;
      for (;;) {
        const i = inbox.findIndex((m) => m.kind === kind);
        if (i >= 0) return inbox.splice(i, 1)[0];
        if (Date.now() > end) return null;
        await new Promise((r) => {
          wake.push(r);
          setTimeout(r, 50);
        });
      }
    };
    return { child, next };
  };
  const receivers = Array.from({ length: opts.receivers }, () => spawn("receiver"));
  for (const r of receivers) if (!(await r.next("ready"))) throw new Error("receiver not ready");
  const senders = Array.from({ length: opts.senders }, (_, i) => {
    const share = Math.floor(opts.events / opts.senders) + (i < opts.events % opts.senders ? 1 : 0);
    return spawn("sender", ["--share", String(share)]);
  });
  for (const s of senders) if (!(await s.next("ready"))) throw new Error("sender not ready");
  for (const r of receivers) if (!(await r.next("probed"))) throw new Error("no probe reached a receiver");
  const pids = (opts.pids ? String(opts.pids).split(",") : []).filter(Boolean);
  const broker0 = pids.map(procCpuMs);
  for (const s of senders) s.child.send({ kind: "go" });
  let start = Infinity;
  for (const s of senders) start = Math.min(start, (await s.next("started")).start);
  const sent = { end: 0, cpu: 0 };
  for (const s of senders) {
    const done = await s.next("sent", 600000);
    sent.end = Math.max(sent.end, done.end);
    sent.cpu += done.cpu;
  }
  const results = [];
  for (const r of receivers) {
    let res = await r.next("result", 30000);
    if (!res) {
      r.child.send({ kind: "report" });
      res = await r.next("result");
    }
    results.push(res);
  }
  const brokerMs = pids.map(procCpuMs).reduce((a, v, i) => a + v - broker0[i], 0);
  let confirmed = null;
  for (const s of senders) {
    s.child.send({ kind: "report" });
    const c = (await s.next("confirmed"))?.confirmed;
    if (c !== null && c !== undefined) confirmed = (confirmed ?? 0) + c;
  }
  for (const p of [...receivers, ...senders]) p.child.send({ kind: "exit" });

  const delivered = results.reduce((a, r) => a + r.count, 0);
  const last = Math.max(...results.map((r) => r.last));
  const all = new Float64Array(delivered);
  let o = 0;
  for (const r of results) {
    all.set(r.lat, o);
    o += r.lat.length;
  }
  all.sort();
  const pct = (q) => (delivered ? round(all[Math.min(delivered - 1, Math.floor(q * delivered))]) : null);
  const secs = (last - start) / 1000;
  console.log(
    JSON.stringify({
      target: opts.mqtt ? `mqtt://${opts.mqtt}` : opts.url,
      sender: opts.mqtt || opts["send-mqtt"] ? "mqtt" : "ws",
      offered_rate: opts.rate || "max",
      receivers: opts.receivers,
      senders: opts.senders,
      sent: opts.events,
      delivered,
      expected: opts.queue ? opts.events : opts.events * opts.receivers,
      duplicates: results.reduce((a, r) => a + (r.duplicates ?? 0), 0),
      confirmed,
      sent_per_sec: Math.round(opts.events / ((sent.end - start) / 1000)),
      events_per_sec: Math.round(delivered / secs),
      p50_ms: pct(0.5),
      p99_ms: pct(0.99),
      max_ms: delivered ? round(all[delivered - 1]) : null,
      cpu_ms: {
        broker: pids.length ? Math.round(brokerMs) : null,
        sender: Math.round(sent.cpu),
        receivers: Math.round(results.reduce((a, r) => a + r.cpu, 0)),
      },
      secs: round(secs),
    }),
  );
  process.exit(0);
}

const round = (x) => Math.round(x * 1000) / 1000;

const role = opts.role || "coordinator";
await { coordinator, sender, receiver }[role]();
