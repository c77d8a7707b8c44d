// Compiled by test/types.test.js with `tsc --noEmit --strict`: how a
// TypeScript service uses the package, and two mistakes the types catch.

import { EXIT_STALLED, Service, type Task } from 'axion-client';

interface Batch {
  items: string[];
}

const service = new Service('embedding', { package: 'homechoice' });
service
  .queue<Batch>('embedding.generate', async (task: Task<Batch>) => {
    task.progress();
    const n: number = task.attempts;
    return { count: task.payload.items.length, n, aborted: task.signal.aborted };
  })
  .event('embedding.request', (event) => ({ from: event.source ?? null }));

async function produce(): Promise<string> {
  const done = await service.enqueue('embedding.generate', { items: ['a'] }, { id: 'x', maxAttempts: 3 });
  await service.publish('embedding.done', { id: done.id });
  return done.queue;
}

// @ts-expect-error a handler must be a function
service.queue('q', 'not a handler');
// @ts-expect-error a payload is JSON, not a function
void service.enqueue('q', () => 1);

const stalled: 71 = EXIT_STALLED;
void produce;
void stalled;
void service.run();
