/**
 * Tasks per second end to end (enqueue → durable commit → delivery → ack)
 * through one `axion serve`, side by side in one run: a Node worker on
 * axion-client fed by an MQTT producer, and the same work through the
 * WebSocket bridge with the legacy JavaScript client as producer and worker.
 * Each round starts a fresh `axion serve` per case and alternates the order;
 * the medians are printed as a Markdown table, with the CPU time per 1 000
 * tasks of the worker and of `axion serve` (which runs the bridge) from
 * `/proc`.
 *
 * Usage: AXION_BIN=target/release/axion node clients/node/bench/queue-throughput.js [tasks] [rounds] [credits]
 */

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { BrokerClient } from '../../../tests/clients/brokerClient.js';
import { Serve, ServiceProc, Watcher } from '../test-support/harness.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const [tasks = 10_000, rounds = 3, credits = 64] = process.argv.slice(2).map(Number);
const QUEUE = 'bench';

/** utime + stime of `pid`, in seconds (`/proc` counts in USER_HZ, 100). */
function cpuSecs(pid) {
  const raw = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = raw.slice(raw.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
}

/** Resolves once the queue owner counts `n` acks; polls its `show` command every 20 ms. */
async function ackedAll(w, n) {
  const reply = 'bench/show';
  await w.client.subscribeAsync(reply, { qos: 1 });
  for (;;) {
    await w.client.publishAsync(`axion/default/queue/${QUEUE}/cmd`, JSON.stringify({ op: 'show', limit: 0, replyTo: reply }), { qos: 1 });
    const shown = await w.next((t) => t === reply, 5_000, 'show reply');
    if (shown.stats.acked_total >= n) return;
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function nodeCase() {
  const serve = await Serve.start();
  const w = await Watcher.connect(serve, ['axion/default/heartbeat/bench-node/+']);
  const worker = new ServiceProc(path.join(here, 'echo-worker.js'), serve, { MAX_INFLIGHT: String(credits), AXION_LOG: 'warn' });
  await w.next((t, hb) => hb.pid === worker.pid && hb.connected, 15_000, 'worker online');
  const cpu0 = cpuSecs(worker.pid);
  const serve0 = cpuSecs(serve.proc.pid);
  const t0 = performance.now();
  const sends = [];
  for (let i = 0; i < tasks; i++) sends.push(w.enqueue(QUEUE, { payload: { i } }));
  await Promise.all(sends);
  await ackedAll(w, tasks);
  const secs = (performance.now() - t0) / 1000;
  const cpu = cpuSecs(worker.pid) - cpu0;
  const serveCpu = cpuSecs(serve.proc.pid) - serve0;
  worker.kill();
  await w.close();
  serve.cleanup();
  return { secs, cpu, serveCpu };
}

async function legacyCase() {
  const serve = await Serve.start();
  const ws = `ws://127.0.0.1:${serve.wsPort}`;
  const worker = spawn(process.execPath, [path.join(here, 'legacy-worker.js'), ws, QUEUE, String(credits)], { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise((resolve) => worker.stdout.once('data', resolve));
  const producer = new BrokerClient({ url: ws });
  await producer.connect();
  const w = await Watcher.connect(serve);
  const cpu0 = cpuSecs(worker.pid);
  const serve0 = cpuSecs(serve.proc.pid);
  const t0 = performance.now();
  for (let i = 0; i < tasks; i++) producer.enqueue(QUEUE, { i });
  await ackedAll(w, tasks);
  const secs = (performance.now() - t0) / 1000;
  const cpu = cpuSecs(worker.pid) - cpu0;
  const serveCpu = cpuSecs(serve.proc.pid) - serve0;
  worker.kill('SIGKILL');
  producer.socket.close();
  await w.close();
  serve.cleanup();
  return { secs, cpu, serveCpu };
}

const cases = { 'Node worker (axion-client, MQTT)': nodeCase, 'legacy JS client through the bridge': legacyCase };
const results = Object.fromEntries(Object.keys(cases).map((k) => [k, []]));
for (let r = 0; r < rounds; r++) {
  const order = r % 2 === 0 ? Object.keys(cases) : Object.keys(cases).reverse();
  for (const name of order) {
    const res = await cases[name]();
    results[name].push(res);
    console.error(`round ${r + 1}: ${name}: ${(tasks / res.secs).toFixed(0)} tasks/s, worker CPU ${res.cpu.toFixed(2)} s, serve CPU ${res.serveCpu.toFixed(2)} s`);
  }
}
const median = (xs) => xs.slice().sort((a, b) => a - b)[Math.floor(xs.length / 2)];
console.log(`| worker | tasks | tasks/s (median of ${rounds}; min – max) | worker CPU ms per 1 000 tasks | axion serve CPU ms per 1 000 tasks |`);
console.log('|---|---|---|---|---|');
for (const [name, rs] of Object.entries(results)) {
  const rates = rs.map((x) => tasks / x.secs);
  const perK = (key) => median(rs.map((x) => (x[key] / tasks) * 1_000_000)).toFixed(0);
  console.log(`| ${name} | ${tasks} | ${median(rates).toFixed(0)} (${Math.min(...rates).toFixed(0)} – ${Math.max(...rates).toFixed(0)}) | ${perK('cpu')} | ${perK('serveCpu')} |`);
}
process.exit(0);
