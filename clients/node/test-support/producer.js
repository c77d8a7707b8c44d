/**
 * A service that produces: on `produce.request` it enqueues a task through
 * `Service#enqueue` (answering with the owner's confirmation or refusal),
 * and on `announce.request` it publishes an event through
 * `Service#publish`.
 */

import { Service } from 'axion-client';

const service = new Service('producer');
service
  .event('produce.request', async (event) => {
    const { queue, payload, id } = event.payload;
    try {
      return { confirmed: await service.enqueue(queue, payload, { id, replyTo: 'embedding.result', correlationId: id }) };
    } catch (err) {
      return { refused: err.message };
    }
  })
  .event('announce.request', async (event) => {
    await service.publish('announced', event.payload);
    return { published: true };
  })
  .run();
