// Enqueues tasks with the legacy JavaScript client (tests/clients/brokerClient.js,
// unchanged) through the WebSocket bridge, and waits until the bridge has
// confirmed each one (`{"enqueued": {"id", "queue"}}`, sent once the queue
// owner has the task on disk). Prints the confirmations as one JSON line.
//
// Usage: node legacy_enqueue.mjs <ws-url> '[{"queue": …, "payload": …}, …]'

import { BrokerClient } from "../../../tests/clients/brokerClient.js";

const [url, tasks] = [process.argv[2], JSON.parse(process.argv[3])];
const client = new BrokerClient({ url });
await client.connect();
const confirmed = [];
client.socket.on("message", (data) => {
  const frame = JSON.parse(data.toString());
  if (frame.error) {
    console.error(`bridge error: ${JSON.stringify(frame)}`);
    process.exit(1);
  }
  if (frame.enqueued) confirmed.push(frame.enqueued);
  if (confirmed.length === tasks.length) {
    console.log(JSON.stringify(confirmed));
    process.exit(0);
  }
});
for (const { queue, payload } of tasks) client.enqueue(queue, payload);
