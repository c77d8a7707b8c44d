/**
 * The example service on a real `axion serve`, watched from a plain MQTT.js
 * client: the retained heartbeat record and its will, tasks by credit with
 * ack, replies and progress, overload refusals, the SIGTERM drain and the
 * release of held tasks on shutdown.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PRODUCER, QUEUE, Serve, Watcher, XL_SERVICE, axionBin, freePort, startExample, startService } from '../test-support/harness.js';

const RESULT = 'axion/default/event/embedding/result';
const isResult = (topic) => topic === RESULT;

test('retained heartbeat record with live fields, and its will on kill -9', async (t) => {
  const serve = await Serve.start();
  t.after(() => serve.cleanup());
  const svc = await startExample(serve);
  t.after(() => svc.kill());
  // A subscriber that connects later gets the retained record at once.
  const w = await Watcher.connect(serve, ['axion/default/heartbeat/embedding/+', RESULT]);
  t.after(() => w.close());
  const first = await w.heartbeat((hb) => hb.pid === svc.pid, 2_000, 'retained record');
  const host = first.hostname;
  assert.equal(first.service, 'embedding');
  assert.equal(first.package, 'default');
  assert.equal(first.instance_id, `${host}:${svc.pid}`);
  assert.equal(first.port, svc.pid, 'no listening port: the pid fills the port slot');
  assert.equal(first.status, 'online');
  assert.equal(first.connected, true);
  assert.equal(first.interval_secs, 1);
  assert.equal(first.queue_depth, 0);
  assert.equal(first.inflight, 0);
  assert.match(first.boot_id, /^[0-9a-f-]{36}$/);
  assert.ok(Number.isInteger(first.seq) && first.seq >= 1);
  assert.ok(Math.abs(first.timestamp - Date.now() / 1000) < 30, 'timestamp in Unix seconds');
  assert.match(first.worker, /^axion-svc-embedding-/, 'worker id for the queue owner');
  assert.ok(first.memory_bytes > 0 && typeof first.proc_start_ticks === 'number' && first.host_boot_id);

  await w.enqueue(QUEUE, { payload: { items: ['a'] }, replyTo: 'embedding.result', correlationId: 'c' });
  await w.next(isResult);
  const busy = await w.heartbeat((hb) => hb.pid === svc.pid && typeof hb.avg_job_ms === 'number', 5_000, 'record with avg_job_ms');
  assert.ok(busy.seq > first.seq, 'seq counts the records');
  assert.equal(busy.boot_id, first.boot_id);
  assert.ok(busy.last_progress_ts >= first.timestamp - 1);

  const json = execFileSync(axionBin(), ['monitor', '--once', '--json', '--service', 'embedding', '--mqtt', serve.url], { encoding: 'utf8' });
  assert.match(json, new RegExp(`"pid":\\s*${svc.pid}`), `axion monitor shows the instance: ${json}`);

  svc.kill();
  const will = await w.heartbeat((hb) => hb.pid === svc.pid && hb.status === 'offline', 5_000, 'the will');
  assert.equal(will.reason, 'lost');
  assert.equal(will.boot_id, first.boot_id);
});

test('tasks from a producer reach the handler, are acked and answered; events are answered', async (t) => {
  const serve = await Serve.start();
  t.after(() => serve.cleanup());
  const svc = await startExample(serve);
  t.after(() => svc.kill());
  const w = await Watcher.connect(serve, [RESULT, 'axion/default/event/req/reply', `axion/default/queue/${QUEUE}/dead`]);
  t.after(() => w.close());
  for (let i = 0; i < 5; i++) {
    await w.enqueue(QUEUE, { payload: { items: ['a', `b${i}`] }, replyTo: 'embedding.result', correlationId: `c${i}` });
  }
  const seen = new Set();
  for (let i = 0; i < 5; i++) {
    const r = await w.next(isResult);
    assert.equal(r.type, 'embedding.result');
    assert.equal(r.source, 'embedding');
    assert.equal(r.payload.embeddings.length, 2);
    assert.equal(r.payload.attempts, 1);
    seen.add(r.correlationId);
  }
  assert.deepEqual([...seen].sort(), ['c0', 'c1', 'c2', 'c3', 'c4'], 'every task answered once, on its correlationId');
  const shown = await w.show(QUEUE);
  assert.equal(shown.stats.acked_total, 5, JSON.stringify(shown));
  assert.equal(shown.stats.depth, 0);

  await w.request('embedding.request', { payload: { items: ['x'] }, replyTo: 'req.reply', correlationId: 'e1' });
  const r = await w.next((topic) => topic === 'axion/default/event/req/reply');
  assert.equal(r.correlationId, 'e1');
  assert.equal(r.payload.embeddings.length, 1);

  await w.enqueue(QUEUE, { payload: { items: ['x'], fail: 'bad input' }, maxAttempts: 1, id: 'doomed' });
  const dead = await w.next((topic, d) => topic === `axion/default/queue/${QUEUE}/dead` && d.id === 'doomed');
  assert.equal(dead.reason, 'bad input', 'a thrown error fails the attempt with its message');
});

test('with AXION_DIRECTED_DELIVERY two instances take their tasks on their own topics, each task done once', async (t) => {
  const serve = await Serve.start();
  t.after(() => serve.cleanup());
  const ready = `axion/default/queue/${QUEUE}/ready`;
  const own = `axion/default/queue/${QUEUE}/tasks/`;
  const w = await Watcher.connect(serve, [RESULT, ready, `${own}+`]);
  t.after(() => w.close());
  const env = { MAX_INFLIGHT: '2', AXION_DIRECTED_DELIVERY: '1' };
  const a = await startExample(serve, env);
  t.after(() => a.kill());
  const b = await startExample(serve, env);
  t.after(() => b.kill());
  const named = new Set();
  while (named.size < 2) {
    const credit = await w.next((topic, c) => topic === ready && c.directed === true && !named.has(c.worker), 10_000, 'directed credit');
    named.add(credit.worker);
  }
  for (let i = 0; i < 10; i++) {
    await w.enqueue(QUEUE, { payload: { items: [`t${i}`], delay_ms: 100 }, replyTo: 'embedding.result', correlationId: `c${i}` });
  }
  const pids = new Map();
  for (let i = 0; i < 10; i++) {
    const r = await w.next(isResult);
    assert.ok(!pids.has(r.correlationId), `done twice: ${JSON.stringify(r)}`);
    pids.set(r.correlationId, r.payload.pid);
  }
  assert.deepEqual(new Set(pids.values()), new Set([a.pid, b.pid]), 'both instances worked');
  for (let i = 0; i < 10; i++) {
    const record = await w.next((topic) => topic.startsWith(own), 5_000, 'a directed task record');
    assert.ok(named.has(record.worker), JSON.stringify(record));
  }
  const shown = await w.show(QUEUE);
  assert.equal(shown.stats.acked_total, 10, JSON.stringify(shown));
  assert.equal(shown.stats.stray_acks_total, 0, JSON.stringify(shown));
});

test('two instances share a queue by credit, each task done once', async (t) => {
  const serve = await Serve.start();
  t.after(() => serve.cleanup());
  const env = { MAX_INFLIGHT: '2' };
  const a = await startExample(serve, env);
  t.after(() => a.kill());
  const b = await startExample(serve, env);
  t.after(() => b.kill());
  const w = await Watcher.connect(serve, [RESULT]);
  t.after(() => w.close());
  const n = 24;
  for (let i = 0; i < n; i++) {
    await w.enqueue(QUEUE, { payload: { items: [i], delay_ms: 150 }, replyTo: 'embedding.result', correlationId: String(i) });
  }
  const done = new Set();
  const pids = new Set();
  for (let i = 0; i < n; i++) {
    const r = await w.next(isResult);
    assert.equal(r.payload.attempts, 1, `no task bounced or timed out: ${JSON.stringify(r)}`);
    assert.ok(!done.has(r.correlationId), `done twice: ${r.correlationId}`);
    done.add(r.correlationId);
    pids.add(r.payload.pid);
  }
  assert.equal(pids.size, 2, 'both instances took work');
});

test('a long task keeps its ack wait alive with progress', async (t) => {
  const serve = await Serve.start(['--ack-wait-ms', '600']);
  t.after(() => serve.cleanup());
  const svc = await startExample(serve, { AXION_QUEUE_ACK_WAIT_MS: '600', LIVENESS_MAX_STALL_MS: '1000' });
  t.after(() => svc.kill());
  const w = await Watcher.connect(serve, [RESULT]);
  t.after(() => w.close());
  // 2.4 s over three items: longer than the ack wait and the stall limit,
  // with progress after each item.
  await w.enqueue(QUEUE, { payload: { items: [1, 2, 3], delay_ms: 2400 }, replyTo: 'embedding.result', correlationId: 'long' });
  const r = await w.next(isResult);
  assert.equal(r.correlationId, 'long');
  assert.equal(r.payload.attempts, 1, 'a 2.4 s task under a 600 ms ack wait was never redelivered');
  assert.equal(svc.proc.exitCode, null, `progress kept the watchdog quiet; log:\n${svc.stderr}`);
});

test('a burst of ten times MAX_QUEUE gets results or overloaded at once', async (t) => {
  const serve = await Serve.start();
  t.after(() => serve.cleanup());
  const [inflight, queue] = [2, 4];
  const svc = await startExample(serve, { MAX_INFLIGHT: '2', MAX_QUEUE: '4', EMBED_DELAY_MS: '300' });
  t.after(() => svc.kill());
  const w = await Watcher.connect(serve, ['axion/default/event/burst/reply']);
  t.after(() => w.close());
  const n = 10 * queue;
  const start = Date.now();
  await Promise.all(
    Array.from({ length: n }, (_, i) =>
      w.request('embedding.request', { payload: { items: [i] }, replyTo: 'burst.reply', correlationId: String(i) })),
  );
  const answers = new Map();
  while (answers.size < n) {
    const r = await w.next((topic) => topic === 'axion/default/event/burst/reply');
    assert.ok(!answers.has(r.correlationId), 'one answer per request');
    answers.set(r.correlationId, { payload: r.payload, at: Date.now() - start });
  }
  const overloaded = [...answers.values()].filter((a) => a.payload.overloaded === true);
  const results = [...answers.values()].filter((a) => Array.isArray(a.payload.embeddings)).length;
  t.diagnostic(`burst of ${n}: ${results} results, ${overloaded.length} overloaded`);
  assert.equal(overloaded.length + results, n, 'every caller got a result or overloaded');
  assert.ok(results >= inflight + queue, `admitted work done: ${results}`);
  assert.ok(overloaded.length > 0, 'the burst beyond the limits was refused');
  for (const { payload, at } of overloaded) {
    assert.deepEqual(Object.keys(payload).sort(), ['overloaded', 'retry_after_ms']);
    assert.ok(Number.isInteger(payload.retry_after_ms) && payload.retry_after_ms > 0, JSON.stringify(payload));
    assert.ok(at < 1500, `refusals come at once, not after the work: ${at} ms`);
  }
});

test('SIGTERM mid-task: draining, the result, offline/stopped, exit 0', async (t) => {
  const serve = await Serve.start();
  t.after(() => serve.cleanup());
  const svc = await startExample(serve, { DRAIN_MS: '5000' });
  t.after(() => svc.kill());
  const w = await Watcher.connect(serve, [RESULT, 'axion/default/heartbeat/embedding/+']);
  t.after(() => w.close());
  await w.enqueue(QUEUE, { payload: { items: ['x'], delay_ms: 1000 }, replyTo: 'embedding.result', correlationId: 't' });
  await w.heartbeat((hb) => hb.pid === svc.pid && hb.inflight === 1, 10_000, 'heartbeat with the task in flight');
  w.messages.length = 0;
  svc.signal('SIGTERM');
  const order = [];
  while (order.at(-1) !== 'offline') {
    const m = await w.next((topic, v) => isResult(topic) || v.pid === svc.pid, 10_000, 'drain sequence');
    const step = m.type === 'embedding.result' ? 'result' : m.status;
    if (step === 'offline') assert.equal(m.reason, 'stopped');
    if (order.at(-1) !== step) order.push(step);
  }
  assert.deepEqual(order, ['draining', 'result', 'offline']);
  assert.equal(await svc.exitWithin(5_000), 0);
  assert.doesNotMatch(svc.stderr, /lost the broker/, 'its own DISCONNECT is not a lost broker');
  const shown = await w.show(QUEUE);
  assert.equal(shown.stats.acked_total, 1, JSON.stringify(shown));
  assert.equal(shown.stats.depth, 0);
});

test('SIGTERM hands back a task that outlives DRAIN_MS, and another worker gets it', async (t) => {
  const serve = await Serve.start();
  t.after(() => serve.cleanup());
  const svc = await startExample(serve, { DRAIN_MS: '300', EMBED_DELAY_MS: '60000' });
  t.after(() => svc.kill());
  const w = await Watcher.connect(serve, [RESULT, 'axion/default/heartbeat/embedding/+']);
  t.after(() => w.close());
  await w.enqueue(QUEUE, { payload: { items: ['x'] }, id: 'slow', replyTo: 'embedding.result', correlationId: 'slow' });
  await w.heartbeat((hb) => hb.pid === svc.pid && hb.inflight === 1, 10_000, 'heartbeat with the task in flight');
  const t0 = Date.now();
  svc.signal('SIGTERM');
  assert.equal(await svc.exitWithin(5_000), 0);
  assert.ok(Date.now() - t0 < 300 + 1500, `stopped ${Date.now() - t0} ms after SIGTERM`);
  const shown = await w.show(QUEUE);
  const task = shown.tasks.find((x) => x.id === 'slow');
  assert.ok(task, `task kept by the queue: ${JSON.stringify(shown)}`);
  assert.equal(task.attempts, 0, `handed back, not counted: ${JSON.stringify(task)}`);
  assert.notEqual(task.state, 'inflight');

  const other = await startExample(serve, { EMBED_DELAY_MS: '0' });
  t.after(() => other.kill());
  const r = await w.next(isResult, 10_000, 'the released task done by another worker');
  assert.equal(r.correlationId, 'slow');
  assert.equal(r.payload.pid, other.pid);
  assert.equal(r.payload.attempts, 1);
});

test('tasks handed back at the end of a drain reach another worker at once', async (t) => {
  // The owner delivers what the drain hands back through the queue's shared
  // subscription. A stopping worker still in that group would get about
  // half of it and drop it unseen: those tasks would wait out the ack wait
  // (30 s) instead of moving at once.
  const serve = await Serve.start();
  t.after(() => serve.cleanup());
  const doneDir = fs.mkdtempSync(path.join(os.tmpdir(), 'axion-node-done-'));
  t.after(() => fs.rmSync(doneDir, { recursive: true, force: true }));
  const env = { XL_ROLE: 'worker', XL_DONE_DIR: doneDir };
  const a = await startService(serve, XL_SERVICE, 'xl-node', { ...env, DRAIN_MS: '300' });
  t.after(() => a.kill());
  const w = await Watcher.connect(serve, ['axion/default/heartbeat/xl-node/+', 'axion/default/event/xl/done']);
  t.after(() => w.close());
  for (let i = 0; i < 8; i++) await w.enqueue('xl.node', { payload: { key: `k${i}`, block_pid: a.pid }, id: `k${i}` });
  await w.next((topic, hb) => topic.includes('/heartbeat/') && hb.pid === a.pid && hb.inflight === 8, 10_000, 'all 8 tasks running');
  const b = await startService(serve, XL_SERVICE, 'xl-node', env);
  t.after(() => b.kill());
  a.signal('SIGTERM');
  assert.equal(await a.exitWithin(5_000), 0);
  const done = new Map();
  while (done.size < 8) {
    let d;
    try {
      d = (await w.next((topic) => topic === 'axion/default/event/xl/done', 5_000, 'a task done')).payload;
    } catch {
      break;
    }
    done.set(d.key, d);
  }
  assert.deepEqual([...done.keys()].sort(), [...Array(8).keys()].map((i) => `k${i}`), 'every task done within 5 s of the drain');
  for (const d of done.values()) assert.deepEqual([d.pid, d.attempts], [b.pid, 1]);
});

test('Service#enqueue resolves on the owner\'s confirmation or rejects with its refusal; Service#publish sends an envelope', async (t) => {
  const serve = await Serve.start(['--queue-limit', 'tiny=1']);
  t.after(() => serve.cleanup());
  const producer = await startService(serve, PRODUCER, 'producer');
  t.after(() => producer.kill());
  const worker = await startExample(serve);
  t.after(() => worker.kill());
  const w = await Watcher.connect(serve, [RESULT, 'axion/default/event/prod/reply', 'axion/default/event/announced']);
  t.after(() => w.close());
  const reply = (topic) => topic === 'axion/default/event/prod/reply';

  await w.request('produce.request', { payload: { queue: QUEUE, payload: { items: ['p'] }, id: 'from-node' }, replyTo: 'prod.reply' });
  const confirmed = await w.next(reply);
  assert.deepEqual(confirmed.payload, { confirmed: { id: 'from-node', queue: QUEUE } });
  const r = await w.next(isResult);
  assert.equal(r.correlationId, 'from-node', 'the enqueued task reached the worker');

  await w.request('produce.request', { payload: { queue: 'tiny', payload: 1, id: 'one' }, replyTo: 'prod.reply' });
  assert.ok((await w.next(reply)).payload.confirmed);
  await w.request('produce.request', { payload: { queue: 'tiny', payload: 2, id: 'two' }, replyTo: 'prod.reply' });
  const refused = await w.next(reply);
  assert.match(refused.payload.refused ?? '', /full/, JSON.stringify(refused));

  await w.request('announce.request', { payload: { n: 7 }, replyTo: 'prod.reply' });
  const announced = await w.next((topic) => topic === 'axion/default/event/announced');
  assert.equal(announced.type, 'announced');
  assert.equal(announced.source, 'producer');
  assert.deepEqual(announced.payload, { n: 7 });
});

test('HEALTH_LISTEN: probes answer, and the port names the instance', async (t) => {
  const serve = await Serve.start();
  t.after(() => serve.cleanup());
  const health = await freePort();
  const svc = await startExample(serve, { HEALTH_LISTEN: `127.0.0.1:${health}` });
  t.after(() => svc.kill());
  const w = await Watcher.connect(serve, ['axion/default/heartbeat/embedding/+']);
  t.after(() => w.close());
  const hb = await w.heartbeat((h) => h.pid === svc.pid, 2_000, 'retained record');
  assert.equal(hb.port, health);
  assert.equal(hb.instance_id, `${hb.hostname}:${health}`);
  assert.match(hb.worker, new RegExp(`-${health}$`));
  const get = async (p) => {
    const res = await fetch(`http://127.0.0.1:${health}${p}`);
    return [res.status, await res.json()];
  };
  const [liveCode, live] = await get('/health/live');
  assert.equal(liveCode, 200);
  assert.equal(live.connected, true);
  assert.equal(live.inflight, 0);
  const [readyCode] = await get('/health/ready');
  assert.equal(readyCode, 200);
});
