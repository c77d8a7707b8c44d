// Runs the legacy HeartbeatClient (tests/clients/HeartbeatClient.js,
// unchanged) the way a service does: `new HeartbeatClient({...}).start()`.
//
// Usage: node legacy_heartbeat_client.js <url> <name> [interval-ms]
//   (or HEARTBEAT_URL, name, HEARTBEAT_INTERVAL_MS in the environment)
// Prints `ready <reply-json>` once, after the first heartbeat succeeded.
import { writeSync } from "node:fs";
import { HeartbeatClient } from "./HeartbeatClient.js";

const url = process.argv[2] || process.env.HEARTBEAT_URL;
const name = process.argv[3] || process.env.name;
const interval = Number(process.argv[4] || process.env.HEARTBEAT_INTERVAL_MS || 3000);

let first = true;
const client = new HeartbeatClient({
  url,
  name,
  interval,
  onHeartbeat: (data) => {
    if (first) {
      first = false;
      writeSync(1, `ready ${JSON.stringify(data)}\n`);
    }
  },
});
client.start();
