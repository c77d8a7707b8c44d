// Drives the legacy brokerClient.js (unchanged) through the bridge for
// tests/bridge.rs. Usage: node js_driver.js <scenario> <ws-url> [args...]
// Prints one JSON line with what it saw; exits 1 with a reason on failure.
// Raw frames are read from the client's public `socket` so that effects the
// client's own handler map hides (wildcards, unsubscribe) can be checked.
import { BrokerClient } from "./brokerClient.js";
import WebSocket from "ws";

const [, , scenario, url, ...args] = process.argv;

function fail(why) {
  console.error(`FAIL: ${why}`);
  process.exit(1);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Polls `cond` until true; calls `tick` every `every` ms meanwhile.
async function until(cond, ms, what, tick, every = 50) {
  const end = Date.now() + ms;
  let next = 0;
  while (!cond()) {
    if (Date.now() > end) fail(`timed out waiting for ${what}`);
    if (tick && Date.now() >= next) {
      tick();
      next = Date.now() + every;
    }
    await sleep(5);
  }
}

function rawFrames(client) {
  const frames = [];
  client.socket.on("message", (data) => frames.push(JSON.parse(data.toString())));
  return frames;
}

async function connect() {
  const c = new BrokerClient({ url });
  await c.connect();
  return c;
}

async function pubsub() {
  const n = Number(args[0] || 1000);
  const a = await connect();
  const b = await connect();
  const aRaw = rawFrames(a);
  const got = [];
  const own = [];
  a.subscribe("fs.change", (e) => got.push(e));
  b.subscribe("fs.change", (e) => own.push(e));
  await until(
    () => got.length > 0 && own.length > 0,
    5000,
    "the subscription to become active",
    () => b.publish("fs.change", { probe: true }),
  );
  for (let i = 0; i < n; i++) b.publish("fs.change", { seq: i });
  const seqs = (list) => list.filter((e) => e.payload && e.payload.seq !== undefined).map((e) => e.payload.seq);
  await until(() => seqs(got).length >= n && seqs(own).length >= n, 10000, `${n} events`);
  const order = seqs(got);
  for (let i = 0; i < n; i++) if (order[i] !== i) fail(`event ${i} arrived as ${order[i]}`);
  if (seqs(own).some((s, i) => s !== i)) fail("publisher's own events out of order");
  const sample = got.find((e) => e.payload.seq === 0);
  if (sample.type !== "fs.change" || sample.source !== b.id || typeof sample.timestamp !== "string")
    fail(`bad envelope ${JSON.stringify(sample)}`);

  // Unsubscribe. A sentinel reaching `a` proves the bridge has taken its
  // unsubscribe (sent before the sentinel's subscribe). An event published
  // after that, and before a second sentinel that arrives, must not reach
  // it. (Publishing both from the start raced: an event the bridge routed
  // just before the unsubscribe was rightly delivered.)
  a.unsubscribe("fs.change");
  const sentinel = [];
  a.subscribe("fs.sentinel", (e) => sentinel.push(e));
  await until(() => sentinel.length > 0, 5000, "the sentinel", () => b.publish("fs.sentinel", {}));
  b.publish("fs.change", { after: true });
  b.publish("fs.sentinel", { second: true });
  await until(() => sentinel.some((e) => e.payload && e.payload.second), 5000, "the second sentinel");
  if (aRaw.some((f) => f.event && f.event.payload && f.event.payload.after))
    fail("received an event after unsubscribe");

  // Request/response through replyTo + correlationId.
  a.subscribe("svc.request", (e) => a.publish(e.replyTo, { answer: e.payload.q * 2 }, { correlationId: e.correlationId }));
  const replies = [];
  b.subscribe("reply.b", (e) => replies.push(e));
  let k = 0;
  await until(() => replies.length > 0, 5000, "a reply", () =>
    b.publish("svc.request", { q: 21 }, { correlationId: `c-${k++}`, replyTo: "reply.b" }),
  );
  const reply = replies[0];
  if (reply.payload.answer !== 42 || !/^c-\d+$/.test(reply.correlationId) || reply.source !== a.id)
    fail(`bad reply ${JSON.stringify(reply)}`);

  // Wildcards reach the raw socket with the concrete type.
  a.subscribe("sensor.+", () => {});
  a.subscribe("deep.#", () => {});
  await until(
    () => aRaw.some((f) => f.event && f.event.type === "sensor.temp") && aRaw.some((f) => f.event && f.event.type === "deep.a.b"),
    5000,
    "wildcard deliveries",
    () => {
      b.publish("sensor.temp", { c: 1 });
      b.publish("deep.a.b", { d: 1 });
    },
  );
  // Exactly once: the bridge delivers its own clients' events itself and
  // the broker must not echo them back (No Local); by now, after several
  // round trips through the broker, an echo would have arrived.
  if (seqs(got).length !== n || seqs(own).length !== n)
    fail(`events delivered more than once: ${seqs(got).length} and ${seqs(own).length} of ${n}`);
  console.log(JSON.stringify({ ok: true, delivered: order.length, own: seqs(own).length, reply }));
  process.exit(0);
}

// A healthy subscriber and one that never reads, during a flood.
async function slow() {
  const n = Number(args[0] || 20000);
  const size = Number(args[1] || 1024);
  const pub = await connect();
  const healthy = await connect();
  const stalled = new WebSocket(url);
  await new Promise((res, rej) => {
    stalled.on("open", res);
    stalled.on("error", rej);
  });
  let stalledClosed = false;
  stalled.on("close", () => (stalledClosed = true));
  stalled.on("error", () => (stalledClosed = true));
  stalled.send(JSON.stringify({ action: "subscribe", topic: "flood.data" }));
  let probeSeen = 0;
  const seqs = [];
  healthy.subscribe("flood.data", (e) => {
    if (e.payload.seq === undefined) probeSeen++;
    else seqs.push(e.payload.seq);
  });
  // The stalled client's subscription is active once the healthy one sees
  // probes published after both subscribed (same bridge, same broker).
  await until(() => probeSeen > 0, 5000, "flood subscription", () => pub.publish("flood.data", { probe: true }));
  stalled.pause(); // stop reading from the socket from now on
  const filler = "x".repeat(size);
  const started = Date.now();
  for (let i = 0; i < n; i++) {
    pub.publish("flood.data", { seq: i, filler });
    if (i % 500 === 499) await sleep(0); // let the socket drain
  }
  await until(() => seqs.length >= n, 60000, `${n} flood events at the healthy client`);
  const secs = (Date.now() - started) / 1000;
  for (let i = 0; i < n; i++) if (seqs[i] !== i) fail(`healthy client: event ${i} arrived as ${seqs[i]}`);
  stalled.resume();
  await until(() => stalledClosed, 10000, "the stalled client to be disconnected");
  console.log(JSON.stringify({ ok: true, delivered: seqs.length, secs, stalledClosed }));
  process.exit(0);
}

// Task actions end to end with a queue owner on the same broker.
async function tasks() {
  const queue = args[0] || "jobs.test";
  const producer = await connect();
  const confirmations = [];
  producer.socket.on("message", (d) => {
    const m = JSON.parse(d.toString());
    if (m.enqueued) confirmations.push(m.enqueued);
  });
  producer.enqueue(queue, { n: 1 });
  producer.enqueue(queue, { n: 2 });
  await until(() => confirmations.length === 2, 10000, "enqueue confirmations");

  // A worker that takes a task and disconnects without acking: the task
  // must reach the next worker.
  const quitter = await connect();
  const quitterTasks = [];
  quitter.onTaskReceived((t) => quitterTasks.push(t));
  quitter.pull(queue);
  await until(() => quitterTasks.length === 1, 10000, "a task for the first worker");
  quitter.socket.terminate();

  const worker = await connect();
  const seen = [];
  worker.onTaskReceived((t) => {
    seen.push(t);
    worker.ack(t.id);
    if (seen.length < 2) worker.pull(queue);
  });
  worker.pull(queue);
  await until(() => seen.length === 2, 15000, "both tasks at the second worker");
  const ids = new Set(seen.map((t) => t.id));
  if (!ids.has(quitterTasks[0].id)) fail("the abandoned task was not redelivered");
  const payloads = seen.map((t) => t.payload.n).sort();
  if (payloads.join() !== "1,2") fail(`payloads ${payloads}`);
  console.log(JSON.stringify({ ok: true, confirmations, tasks: seen }));
  process.exit(0);
}

// A producer floods `n` enqueues at once, then a worker in the legacy JS
// style (ack, pull again) takes them all: every task once, every enqueue
// confirmed, even when the broker dropped some on the way to the owner.
async function flood() {
  const queue = args[0] || "flood.q";
  const n = Number(args[1] || 400);
  const producer = await connect();
  let confirmed = 0;
  producer.socket.on("message", (d) => {
    if (JSON.parse(d.toString()).enqueued) confirmed++;
  });
  for (let i = 0; i < n; i++) producer.enqueue(queue, { i });
  const worker = await connect();
  const seen = new Set();
  let duplicates = 0;
  worker.onTaskReceived((t) => {
    if (seen.has(t.payload.i)) duplicates++;
    seen.add(t.payload.i);
    worker.ack(t.id);
    worker.pull(queue);
  });
  for (let i = 0; i < 32; i++) worker.pull(queue);
  await until(() => seen.size === n && confirmed === n, 60000, `${n} tasks and confirmations`);
  console.log(JSON.stringify({ confirmed, received: seen.size, duplicates }));
  process.exit(0);
}

// Through a bridge on one node of a clustered broker, with an MQTT.js
// client on another node (`args`: its mqtt:// URL with user and password,
// the package): an MQTT event reaches a WebSocket subscriber, and a
// WebSocket publish reaches the MQTT subscriber, so each crosses the nodes.
async function cluster() {
  const [mqttUrl, pkg] = args;
  const { default: mqtt } = await import("mqtt");
  const prefix = `axion/${pkg}/event/`;
  const node = new URL(mqttUrl);
  const m = mqtt.connect(`mqtt://${node.host}`, {
    protocolVersion: 5,
    username: decodeURIComponent(node.username),
    password: decodeURIComponent(node.password),
    reconnectPeriod: 0,
  });
  await new Promise((resolve, reject) => {
    m.once("connect", resolve);
    m.once("error", reject);
  });
  const onMqtt = [];
  m.on("message", (topic, payload) => onMqtt.push({ topic, body: JSON.parse(payload.toString()) }));
  await m.subscribeAsync(prefix + "cl/pong", { qos: 1 });

  const sub = await connect();
  const pub = await connect();
  const pings = [];
  sub.subscribe("cl.ping", (e) => pings.push(e));
  // Until the bridge's MQTT subscription is active across the cluster,
  // early events are rightly lost: publish until one arrives.
  await until(() => pings.length > 0, 15000, "an MQTT event on the WebSocket", () =>
    m.publish(prefix + "cl/ping", JSON.stringify({ from: "mqtt" }), { qos: 1 }), 250);
  const ping = pings[0];
  if (ping.type !== "cl.ping" || ping.payload.from !== "mqtt" || ping.source !== "mqtt")
    fail(`bad event from MQTT ${JSON.stringify(ping)}`);

  await until(() => onMqtt.length > 0, 15000, "a WebSocket publish on MQTT", () =>
    pub.publish("cl.pong", { from: "ws" }), 250);
  const pong = onMqtt[0];
  if (pong.body.type !== "cl.pong" || pong.body.payload.from !== "ws" || pong.body.source !== pub.id)
    fail(`bad event on MQTT ${JSON.stringify(pong)}`);
  m.end(true);
  console.log(JSON.stringify({ ok: true, ping, pong: pong.body }));
  process.exit(0);
}

const scenarios = { pubsub, slow, tasks, flood, cluster };
if (!scenarios[scenario]) fail(`unknown scenario ${scenario}`);
scenarios[scenario]().catch((e) => fail(e.stack || e));
