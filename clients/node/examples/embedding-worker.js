/**
 * A fake embedding service on axion-client: the legacy embedding worker
 * rewritten on the package, used by the package's tests and the README.
 *
 * It serves the `embedding.generate` queue and answers `embedding.request`
 * events that carry `replyTo`. The "model" is a hash, so it needs no
 * download; long batches report progress item by item, as the legacy
 * worker did, so a job longer than `LIVENESS_MAX_STALL_MS` is not taken for
 * a hang. The payload can ask for misbehaviour, so the fail-fast guarantees
 * can be shown on a real process:
 *
 * - `{"items": ["a", "b"]}` → `{"embeddings": [[…8 floats…], …], "model": "fake-hash-8"}`
 *   (plus `"attempts"` and `"pid"` for queue tasks, so tests see
 *   redeliveries and which instance did the work)
 * - `"delay_ms": N` → takes N ms, spread over the items with progress after
 *   each (also `EMBED_DELAY_MS` for every job)
 * - `"fail": "why"` → the attempt fails with that reason
 * - `"hang": true` → never returns (a promise that never settles)
 * - `"spin": true` → never returns and never yields (a CPU busy loop)
 *
 * Run: `AXION_MQTT_URL=mqtt://127.0.0.1:1883 node clients/node/examples/embedding-worker.js`
 */

import { setTimeout as sleep } from 'node:timers/promises';
import { Service } from 'axion-client';

const DIMENSIONS = 8;

/** A deterministic unit vector from the text's FNV-1a hash. */
function fakeEmbedding(text) {
  let h = 0xcbf29ce484222325n;
  const v = [];
  for (let i = 0; i < DIMENSIONS; i++) {
    for (const b of [...Buffer.from(text), i]) {
      h ^= BigInt(b);
      h = (h * 0x100000001b3n) & 0xffffffffffffffffn;
    }
    v.push(Number(h % 2000n) / 1000 - 1);
  }
  const norm = Math.max(Math.hypot(...v), Number.EPSILON);
  return v.map((x) => x / norm);
}

/** The work itself; `job` is a task or an event (both have `payload`, `progress()` and `signal`). */
async function embed(job) {
  const payload = job.payload ?? {};
  const delay = payload.delay_ms ?? Number(process.env.EMBED_DELAY_MS ?? 0);
  if (payload.fail) throw new Error(payload.fail);
  if (payload.hang) await new Promise(() => {});
  if (payload.spin) {
    for (;;);
  }
  if (!Array.isArray(payload.items)) throw new Error('payload.items must be an array of strings');
  const embeddings = [];
  for (const item of payload.items) {
    if (delay > 0) await sleep(delay / payload.items.length, undefined, { signal: job.signal });
    embeddings.push(fakeEmbedding(JSON.stringify(item)));
    job.progress();
  }
  return { embeddings, model: `fake-hash-${DIMENSIONS}` };
}

new Service('embedding')
  .queue('embedding.generate', async (task) => ({
    ...(await embed(task)),
    attempts: task.attempts,
    pid: process.pid,
  }))
  .event('embedding.request', embed)
  .run();
