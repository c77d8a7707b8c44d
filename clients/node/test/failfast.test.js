/**
 * The fail-fast exits as the supervisor sees them: 70 when the broker is
 * gone longer than DISCONNECT_KILL_MS, 71 when work is pending with no
 * progress for LIVENESS_MAX_STALL_MS (a handler spinning on the event loop,
 * or one whose promise never settles), and an idle service never killed.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { EXAMPLE, QUEUE, Serve, Watcher, startExample } from '../test-support/harness.js';

async function stuckHandlerExits71(t, payload) {
  const serve = await Serve.start();
  t.after(() => serve.cleanup());
  const svc = await startExample(serve, { LIVENESS_MAX_STALL_MS: '1500' });
  t.after(() => svc.kill());
  const w = await Watcher.connect(serve, ['axion/default/heartbeat/embedding/+']);
  t.after(() => w.close());
  await w.enqueue(QUEUE, { payload });
  // The sentinel thread still publishes while the handler holds the main thread.
  await w.heartbeat((hb) => hb.pid === svc.pid && hb.inflight === 1, 10_000, 'heartbeat with the task in flight');
  const stuck = Date.now();
  const code = await svc.exitWithin(10_000);
  const took = Date.now() - stuck;
  t.diagnostic(`${JSON.stringify(payload)} -> exit ${code} after ${took} ms (LIVENESS_MAX_STALL_MS=1500)`);
  assert.equal(code, 71, `exit code for stalled work; log:\n${svc.stderr}`);
  assert.ok(took <= 1500 + 1000, `exited ${took} ms after the handler got stuck (limit 1.5 s + 1 s)`);
  const hb = await w.heartbeat((h) => h.pid === svc.pid && h.status === 'offline', 5_000, 'offline heartbeat');
  assert.equal(hb.reason, 'stalled', `the reason is published: ${JSON.stringify(hb)}`);
  assert.equal(hb.inflight, 1);
}

test('a handler in a CPU busy loop exits 71', (t) => stuckHandlerExits71(t, { items: ['x'], spin: true }));

test('a handler whose promise never settles exits 71', (t) => stuckHandlerExits71(t, { items: ['x'], hang: true }));

test('broker killed: exit 70 within DISCONNECT_KILL_MS + 1 s, and a restart does the task', async (t) => {
  const serve = await Serve.start(['--ack-wait-ms', '1500']);
  t.after(() => serve.cleanup());
  const env = { DISCONNECT_KILL_MS: '1500', AXION_QUEUE_ACK_WAIT_MS: '1500' };
  const svc = await startExample(serve, env);
  t.after(() => svc.kill());
  const w = await Watcher.connect(serve, ['axion/default/heartbeat/embedding/+']);
  await w.enqueue(QUEUE, { payload: { items: ['x'], delay_ms: 3000 }, replyTo: 'embedding.result', correlationId: 'k' });
  await w.heartbeat((hb) => hb.pid === svc.pid && hb.inflight === 1, 10_000, 'heartbeat with the task in flight');
  await w.close();

  await serve.kill();
  const killed = Date.now();
  const code = await svc.exitWithin(10_000);
  const took = Date.now() - killed;
  t.diagnostic(`broker killed -> exit ${code} after ${took} ms (DISCONNECT_KILL_MS=1500)`);
  assert.equal(code, 70, `exit code for a lost broker; log:\n${svc.stderr}`);
  assert.ok(took >= 1500, `not before the limit: ${took} ms`);
  assert.ok(took <= 1500 + 1000, `exited ${took} ms after the broker died (limit 1.5 s + 1 s)`);

  // The supervisor restarts both: the durable task comes back and is done.
  await serve.restart();
  const r = await Watcher.connect(serve, ['axion/default/event/embedding/result']);
  t.after(() => r.close());
  const again = await startExample(serve, env);
  t.after(() => again.kill());
  const result = await r.next((topic) => topic === 'axion/default/event/embedding/result', 15_000, 'result after restart');
  assert.equal(result.correlationId, 'k');
  assert.equal(result.payload.attempts, 2);
});

test('an idle service outlives the stall limit and still works', async (t) => {
  const serve = await Serve.start();
  t.after(() => serve.cleanup());
  const svc = await startExample(serve, { LIVENESS_MAX_STALL_MS: '800' });
  t.after(() => svc.kill());
  const w = await Watcher.connect(serve, ['axion/default/event/embedding/result']);
  t.after(() => w.close());
  // The property under test is "nothing happens while idle": wait 2.5× the limit and look.
  await new Promise((r) => setTimeout(r, 2000));
  assert.equal(svc.proc.exitCode, null, `an idle service must not be killed as stalled; log:\n${svc.stderr}`);
  await w.enqueue(QUEUE, { payload: { items: ['x'] }, replyTo: 'embedding.result', correlationId: 'after-idle' });
  const r = await w.next((topic) => topic === 'axion/default/event/embedding/result');
  assert.equal(r.correlationId, 'after-idle');
  assert.equal(svc.proc.exitCode, null);
});

test('a bad configuration exits 78 and says which value', () => {
  const run = (env) => spawnSync(process.execPath, [EXAMPLE], { env: { ...process.env, ...env }, encoding: 'utf8' });
  const bad = run({ MAX_INFLIGHT: 'eight' });
  assert.equal(bad.status, 78);
  assert.match(bad.stderr, /MAX_INFLIGHT="eight" is not a whole number/);
  const topic = run({ AXION_PACKAGE: 'a/b' });
  assert.equal(topic.status, 78);
  assert.match(topic.stderr, /package "a\/b" must not contain/);
  const health = run({ HEALTH_LISTEN: 'nowhere' });
  assert.equal(health.status, 78);
  assert.match(health.stderr, /HEALTH_LISTEN="nowhere" is not an address/);
});
