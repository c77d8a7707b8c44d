/**
 * The Node side of the cross-language test
 * (`clients/python/tests/test_cross_language.py`); `xl_service.py` beside
 * that test is the Python side, and behaves the same.
 *
 * `XL_ROLE=worker`: service `xl-node`, serving queue `xl.node`. A task's
 * payload is `{key, sleep_ms?, block_pid?, gate?}`:
 *
 * - `block_pid` equal to this process's pid: the handler does not return
 *   (it stands for work cut short by `kill -9`, or handed back when the
 *   drain time is up, which aborts it);
 * - `gate`: the path of a FIFO; the handler reads it, which waits until
 *   the test opens it for writing;
 * - `sleep_ms`: then it takes that long.
 *
 * Once done, the handler appends `{key, id, attempts, pid, lang}` as one
 * JSON line to `$XL_DONE_DIR/node-<pid>.jsonl` (what the test counts),
 * publishes it as event `xl.done` (what the test awaits) and returns it,
 * which acks the task.
 *
 * `XL_ROLE=producer`: service `xl-node-producer`. Event `xl.node.ping` is
 * answered with `{}` (its answer shows the service is subscribed);
 * `xl.node.produce` `{queue, tasks: [{id, payload}]}` enqueues each task through
 * `Service#enqueue`, one after the other, and answers `{ids}` with the ids
 * the queue owner confirmed.
 */

import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Service } from 'axion-client';

const worker = process.env.XL_ROLE === 'worker';
const service = new Service(worker ? 'xl-node' : 'xl-node-producer');

async function work(task) {
  const payload = task.payload;
  if (payload.block_pid === process.pid) {
    await new Promise((_, reject) => task.signal.addEventListener('abort', () => reject(task.signal.reason)));
  }
  if (payload.gate) await fs.promises.readFile(payload.gate);
  if (payload.sleep_ms) await sleep(payload.sleep_ms, undefined, { signal: task.signal });
  const done = { key: payload.key, id: task.id, attempts: task.attempts, pid: process.pid, lang: 'node' };
  fs.appendFileSync(path.join(process.env.XL_DONE_DIR, `node-${process.pid}.jsonl`), `${JSON.stringify(done)}\n`);
  await service.publish('xl.done', done);
  return done;
}

async function produce(event) {
  const ids = [];
  for (const t of event.payload.tasks) ids.push((await service.enqueue(event.payload.queue, t.payload, { id: t.id })).id);
  return { ids };
}

if (worker) service.queue('xl.node', work);
else service.event('xl.node.ping', () => ({})).event('xl.node.produce', produce);
service.run();
