/**
 * A service given several broker URLs (`AXION_MQTT_URL=mqtt://a,mqtt://b`)
 * fails over between them as the Rust runtime does; two `axion serve` stand
 * in for the nodes of a clustered broker. And a broker that refuses the
 * service on every node ends it with exit 78 and the broker's reason.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { EXAMPLE, QUEUE, Serve, ServiceProc, Watcher, axionBin, startExample } from '../test-support/harness.js';

const RESULT = 'axion/default/event/embedding/result';

test('a dead first URL is passed over for the live second', async (t) => {
  const dead = await Serve.start();
  const live = await Serve.start();
  t.after(() => { dead.cleanup(); live.cleanup(); });
  await dead.kill();
  const svc = await startExample(live, { AXION_MQTT_URL: `${dead.url},${live.url}` });
  t.after(() => svc.kill());
  const w = await Watcher.connect(live, [RESULT]);
  t.after(() => w.close());
  await w.enqueue(QUEUE, { payload: { items: ['x'] }, replyTo: 'embedding.result', correlationId: 'second' });
  const r = await w.next((topic) => topic === RESULT, 10_000, 'result through the second node');
  assert.equal(r.correlationId, 'second');
});

test('the service moves to the second node when the first dies, and does not exit 70', async (t) => {
  const a = await Serve.start();
  const b = await Serve.start();
  t.after(() => { a.cleanup(); b.cleanup(); });
  const svc = await startExample(a, { AXION_MQTT_URL: `${a.url},${b.url}`, DISCONNECT_KILL_MS: '1500' });
  t.after(() => svc.kill());
  const w = await Watcher.connect(b, [RESULT, 'axion/default/heartbeat/embedding/+']);
  t.after(() => w.close());
  await a.kill();
  const killed = Date.now();
  await w.heartbeat((hb) => hb.pid === svc.pid && hb.connected === true, 10_000, 'the service connected on B');
  await w.enqueue(QUEUE, { payload: { items: ['y'] }, replyTo: 'embedding.result', correlationId: 'moved' });
  const r = await w.next((topic) => topic === RESULT, 10_000, 'result on B');
  assert.equal(r.correlationId, 'moved');
  // Past DISCONNECT_KILL_MS since A died: only the time without any node counts.
  await new Promise((res) => setTimeout(res, Math.max(0, killed + 3000 - Date.now())));
  assert.equal(svc.proc.exitCode, null, `the service must run on B; log:\n${svc.stderr}`);
});

test('every node refusing the credentials: exit 78 with the reason', async (t) => {
  const hash = spawnSync(axionBin(), ['passwd', '--password', 's3cret-pass'], { encoding: 'utf8' }).stdout.trim();
  const auth = path.join(fs.mkdtempSync(path.join(process.env.TMPDIR ?? '/tmp', 'axion-auth-')), 'auth.toml');
  fs.writeFileSync(auth, `[roles.all]\npublish = ["#"]\nsubscribe = ["#"]\n\n[users.worker]\n${hash}\nroles = ["all"]\n`);
  const a = await Serve.start(['--auth-file', auth]);
  const b = await Serve.start(['--auth-file', auth]);
  t.after(() => { a.cleanup(); b.cleanup(); fs.rmSync(path.dirname(auth), { recursive: true, force: true }); });
  const bad = `mqtt://worker:wrong@127.0.0.1:${a.mqttPort},mqtt://worker:wrong@127.0.0.1:${b.mqttPort}`;
  const svc = new ServiceProc(EXAMPLE, a, { AXION_MQTT_URL: bad });
  t.after(() => svc.kill());
  const code = await svc.exitWithin(30_000);
  assert.equal(code, 78, `exit code for a lasting refusal; log:\n${svc.stderr}`);
  assert.match(svc.stderr, /refused the connection/);
});
