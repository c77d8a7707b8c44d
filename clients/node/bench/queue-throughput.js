/**
 * Tasks per second end to end (enqueue → durable commit → delivery → ack)
 * through one `axion serve`, side by side in one run, for four workers:
 *
 * - a Python worker on axion_client (`clients/python/bench/echo_worker.py`)
 *   and a Node worker on axion-client (`echo-worker.js`), each fed by an MQTT
 *   producer (MQTT.js in this process, every enqueue a QoS 1 publish);
 * - the same work through the WebSocket bridge with the legacy clients: the
 *   legacy JavaScript client as producer, and as worker either the legacy
 *   Python client (`clients/python/bench/legacy_worker.py`) or the legacy
 *   JavaScript one (`legacy-worker.js`).
 *
 * Every worker acks each task at once and holds `credits` tasks (its
 * `MAX_INFLIGHT`, or that many legacy pulls). Each case gets a fresh
 * `axion serve`; each round runs the cases in another order. Printed: a
 * Markdown table of medians, with the CPU time per 1 000 tasks of the worker
 * (its process and its children: the Python package's heartbeat companion)
 * and of `axion serve` (which runs the bridge), from `/proc`; tasks per
 * CPU-second of both together; and each package worker's ratio to the legacy
 * client of its language, taken within each round.
 *
 * Usage: AXION_BIN=target/release/axion node clients/node/bench/queue-throughput.js [tasks] [rounds] [credits]
 *
 * `BENCH_PY_BASELINE=<dir>` adds a case: the Python worker on the copy of
 * `clients/python` in `<dir>` (another version of the package, measured in
 * the same rounds). `BENCH_CASES=<regex>` runs only the cases whose name
 * matches.
 */

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { BrokerClient } from '../../../tests/clients/brokerClient.js';
import { Serve, Watcher } from '../test-support/harness.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const pythonBench = path.resolve(here, '../../python/bench');
const [tasks = 10_000, rounds = 5, credits = 64] = process.argv.slice(2).map(Number);
const QUEUE = 'bench';
const python = process.env.PYTHON ?? 'python3';

/** utime + stime of `pid` and every process below it, in seconds (`/proc` counts in USER_HZ, 100). */
function treeCpuSecs(pid) {
  const stats = new Map();
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const raw = fs.readFileSync(`/proc/${entry}/stat`, 'utf8');
      const f = raw.slice(raw.lastIndexOf(')') + 2).split(' ');
      stats.set(Number(entry), { ppid: Number(f[1]), cpu: (Number(f[11]) + Number(f[12])) / 100 });
    } catch {
      // gone meanwhile
    }
  }
  let total = 0;
  const todo = [pid];
  while (todo.length > 0) {
    const p = todo.pop();
    total += stats.get(p)?.cpu ?? 0;
    for (const [child, s] of stats) if (s.ppid === p) todo.push(child);
  }
  return total;
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

/** A worker process; its stdout is watched for `ready` where it prints one. */
function startProcess(argv, env = {}) {
  const child = spawn(argv[0], argv.slice(1), {
    stdio: ['ignore', 'pipe', 'inherit'],
    env: { ...process.env, ...env },
  });
  child.ready = new Promise((resolve, reject) => {
    child.stdout.on('data', (d) => {
      if (d.toString().includes('ready')) resolve();
    });
    child.once('exit', (code) => reject(new Error(`${argv.join(' ')} exited with ${code} before it was ready`)));
  });
  // Only the legacy workers print `ready`; the others' exit must not be an unhandled rejection.
  child.ready.catch(() => {});
  return child;
}

/** Stops the worker with SIGTERM (a package worker drains, idle, at once) and waits until it is gone. */
async function stop(child) {
  const gone = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGTERM');
  await gone;
}

/** Measures from the first enqueue to the last ack. */
async function measure(serve, worker, w, enqueueAll) {
  const cpu0 = treeCpuSecs(worker.pid);
  const serve0 = treeCpuSecs(serve.proc.pid);
  const t0 = performance.now();
  await enqueueAll();
  await ackedAll(w, tasks);
  const secs = (performance.now() - t0) / 1000;
  return { secs, cpu: treeCpuSecs(worker.pid) - cpu0, serveCpu: treeCpuSecs(serve.proc.pid) - serve0 };
}

/** A worker on an axion package, fed over MQTT; ready once its heartbeat says connected. */
async function packageCase(service, argv, env = {}) {
  const serve = await Serve.start();
  const w = await Watcher.connect(serve, [`axion/default/heartbeat/${service}/+`]);
  const worker = startProcess(argv, {
    AXION_MQTT_URL: serve.url,
    MAX_INFLIGHT: String(credits),
    BENCH_QUEUE: QUEUE,
    AXION_LOG: 'warn',
    PYTHONPATH: path.resolve(here, '../../python'),
    ...env,
  });
  await w.next((t, hb) => hb.pid === worker.pid && hb.connected, 15_000, `${service} online`);
  const res = await measure(serve, worker, w, async () => {
    const sends = [];
    for (let i = 0; i < tasks; i++) sends.push(w.enqueue(QUEUE, { payload: { i } }));
    await Promise.all(sends);
  });
  await stop(worker);
  await w.close();
  serve.cleanup();
  return res;
}

/** A legacy worker through the bridge, fed by the legacy JavaScript client. */
async function legacyCase(argv, env = {}) {
  const serve = await Serve.start();
  const ws = `ws://127.0.0.1:${serve.wsPort}`;
  const worker = startProcess([...argv, ws, QUEUE, String(credits)], env);
  await worker.ready;
  const producer = new BrokerClient({ url: ws });
  await producer.connect();
  const w = await Watcher.connect(serve);
  const res = await measure(serve, worker, w, async () => {
    for (let i = 0; i < tasks; i++) producer.enqueue(QUEUE, { i });
  });
  await stop(worker);
  producer.socket.close();
  await w.close();
  serve.cleanup();
  return res;
}

const legacyPythonPath = { PYTHONPATH: path.resolve(here, '../../../tests/clients') };
const cases = {
  'Python worker (axion_client, MQTT)': {
    run: () => packageCase('bench-py', [python, path.join(pythonBench, 'echo_worker.py')]),
    legacy: 'legacy Python client through the bridge',
  },
  'legacy Python client through the bridge': {
    run: () => legacyCase([python, path.join(pythonBench, 'legacy_worker.py')], legacyPythonPath),
  },
  'Node worker (axion-client, MQTT)': {
    run: () => packageCase('bench-node', [process.execPath, path.join(here, 'echo-worker.js')]),
    legacy: 'legacy JS client through the bridge',
  },
  'legacy JS client through the bridge': {
    run: () => legacyCase([process.execPath, path.join(here, 'legacy-worker.js')]),
  },
};

if (process.env.BENCH_PY_BASELINE) {
  const dir = path.resolve(process.env.BENCH_PY_BASELINE);
  cases[`Python worker (axion_client in ${dir})`] = {
    run: () => packageCase('bench-py', [python, path.join(dir, 'bench/echo_worker.py')], { PYTHONPATH: dir }),
    legacy: 'legacy Python client through the bridge',
  };
}
const only = process.env.BENCH_CASES ? new RegExp(process.env.BENCH_CASES) : null;
for (const name of Object.keys(cases)) if (only && !only.test(name)) delete cases[name];
const names = Object.keys(cases);
/** name → one result per round. */
const results = Object.fromEntries(names.map((k) => [k, []]));
for (let r = 0; r < rounds; r++) {
  const order = names.map((_, i) => names[(i + r) % names.length]);
  if (r % 2 === 1) order.reverse();
  for (const name of order) {
    const res = await cases[name].run();
    results[name].push(res);
    console.error(`round ${r + 1}: ${name}: ${(tasks / res.secs).toFixed(0)} tasks/s, worker CPU ${res.cpu.toFixed(2)} s, serve CPU ${res.serveCpu.toFixed(2)} s`);
  }
}

const median = (xs) => {
  const s = xs.slice().sort((a, b) => a - b);
  return s.length % 2 === 1 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const rate = (x) => tasks / x.secs;
const perCpuSec = (x) => tasks / (x.cpu + x.serveCpu);
const spread = (xs, digits) => `${median(xs).toFixed(digits)} (${Math.min(...xs).toFixed(digits)} – ${Math.max(...xs).toFixed(digits)})`;

console.log(`${tasks} tasks per case, ${credits} credits, ${rounds} rounds; medians (min – max over the rounds)\n`);
console.log('| worker | tasks/s | worker CPU ms per 1 000 tasks | axion serve CPU ms per 1 000 tasks | tasks per CPU-second (worker + serve) | tasks/s ÷ its legacy client | tasks per CPU-s ÷ its legacy client |');
console.log('|---|---|---|---|---|---|---|');
for (const name of names) {
  const rs = results[name];
  const perK = (key) => median(rs.map((x) => (x[key] / tasks) * 1_000_000)).toFixed(0);
  let ratios = '| – | – |';
  const legacy = cases[name].legacy;
  if (legacy && results[legacy]) {
    // Within each round: the two ran close together, under the same load.
    const byRound = (f) => rs.map((x, i) => f(x) / f(results[legacy][i]));
    ratios = `| ${spread(byRound(rate), 2)} | ${spread(byRound(perCpuSec), 2)} |`;
  }
  console.log(`| ${name} | ${spread(rs.map(rate), 0)} | ${perK('cpu')} | ${perK('serveCpu')} | ${spread(rs.map(perCpuSec), 0)} ${ratios}`);
}
process.exit(0);
