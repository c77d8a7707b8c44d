/**
 * The Node worker beside the rest of the fleet: tasks from the legacy
 * JavaScript client through the bridge and from `axion queue enqueue`,
 * a legacy client's request answered, and no task lost when a worker is
 * killed with -9 mid-task (its heartbeat's will hands the task on).
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { QUEUE, Serve, Watcher, axionBin, startExample } from '../test-support/harness.js';
import { BrokerClient } from '../../../tests/clients/brokerClient.js';

const RESULT = 'axion/default/event/embedding/result';

test('tasks from the legacy JS client (bridge) and axion queue enqueue reach the Node worker; legacy requests are answered', async (t) => {
  const serve = await Serve.start();
  t.after(() => serve.cleanup());
  const svc = await startExample(serve);
  t.after(() => svc.kill());
  const legacy = new BrokerClient({ url: `ws://127.0.0.1:${serve.wsPort}` });
  await legacy.connect();
  t.after(() => legacy.socket.close());
  const w = await Watcher.connect(serve, [RESULT]);
  t.after(() => w.close());

  // The legacy `enqueue` carries the payload only: the task is done and acked.
  legacy.enqueue(QUEUE, { items: ['from-ws'] });
  await promisify(execFile)(axionBin(), ['queue', 'enqueue', '--mqtt', serve.url, QUEUE, '--payload',
    '{"items":["from-cli"]}', '--reply-to', 'embedding.result', '--correlation-id', 'cli']);
  const r = await w.next((topic) => topic === RESULT);
  assert.equal(r.correlationId, 'cli');
  for (;;) {
    const shown = await w.show(QUEUE);
    if (shown.stats.acked_total === 2) break;
    assert.ok(shown.stats.acked_total < 2, JSON.stringify(shown));
    await new Promise((res) => setTimeout(res, 50));
  }

  // What the legacy client receives on `legacy.reply`, and a way to wait for it.
  const replies = [];
  const waiters = new Set();
  legacy.subscribe('legacy.reply', (event) => {
    replies.push(event);
    for (const wake of waiters) wake();
  });
  const replyWhere = (pred, ms) => new Promise((resolve) => {
    const done = (found) => {
      clearTimeout(timer);
      waiters.delete(look);
      resolve(found);
    };
    const look = () => {
      const found = replies.find(pred);
      if (found) done(found);
    };
    const timer = setTimeout(() => done(null), ms);
    waiters.add(look);
    look();
  });
  // The legacy protocol does not confirm a subscription: probe it from MQTT
  // until the bridge relays one.
  while (!(await (async () => {
    await w.client.publishAsync('axion/default/event/legacy/reply', JSON.stringify({ type: 'legacy.reply', payload: 'probe' }), { qos: 1 });
    return replyWhere(() => true, 100);
  })()));
  legacy.publish('embedding.request', { items: ['a', 'b'] }, { replyTo: 'legacy.reply', correlationId: 'ws1' });
  const reply = await replyWhere((e) => e.correlationId === 'ws1', 10_000);
  assert.ok(reply, 'the legacy client got its answer');
  assert.equal(reply.correlationId, 'ws1');
  assert.equal(reply.source, 'embedding');
  assert.equal(reply.payload.embeddings.length, 2);
});

test('a worker killed with -9 mid-task: another gets the task at once, done once', async (t) => {
  const serve = await Serve.start();
  t.after(() => serve.cleanup());
  const doomed = await startExample(serve, { EMBED_DELAY_MS: '60000' });
  t.after(() => doomed.kill());
  const w = await Watcher.connect(serve, [RESULT, 'axion/default/heartbeat/embedding/+']);
  t.after(() => w.close());
  await w.enqueue(QUEUE, { payload: { items: ['x'] }, id: 'k9', replyTo: 'embedding.result', correlationId: 'k9' });
  await w.heartbeat((hb) => hb.pid === doomed.pid && hb.inflight === 1, 10_000, 'heartbeat with the task in flight');
  const other = await startExample(serve, { EMBED_DELAY_MS: '0' });
  t.after(() => other.kill());
  const killed = Date.now();
  doomed.kill();
  const r = await w.next((topic) => topic === RESULT, 10_000, 'the task done by the other worker');
  t.diagnostic(`redelivered and done ${Date.now() - killed} ms after kill -9 (ack wait 30 s)`);
  assert.equal(r.correlationId, 'k9');
  assert.equal(r.payload.pid, other.pid);
  assert.equal(r.payload.attempts, 2, 'the killed delivery counts as an attempt');
  await assert.rejects(w.next((topic) => topic === RESULT, 500), /no/, 'done once');
});
