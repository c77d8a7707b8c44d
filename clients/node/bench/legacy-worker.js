/**
 * The benchmark's legacy worker: the legacy JavaScript client through the
 * bridge, in the legacy service template's style (on each task: ack, then
 * pull again), holding `credits` pulls. Prints `ready` once connected.
 *
 * Usage: node legacy-worker.js <ws-url> <queue> <credits>
 */

import { BrokerClient } from '../../../tests/clients/brokerClient.js';

const [url, queue, credits] = process.argv.slice(2);
const client = new BrokerClient({ url });
await client.connect();
client.onTaskReceived((task) => {
  client.ack(task.id);
  client.pull(queue);
});
for (let i = 0; i < Number(credits); i++) client.pull(queue);
process.stdout.write('ready\n');
