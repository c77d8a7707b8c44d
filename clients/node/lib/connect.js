/**
 * One MQTT 5 connection made the way every Axion client makes it.
 *
 * TCP_NODELAY, because every queue hand-off (credit, delivery, claim,
 * release) is a small message and Nagle's algorithm would add ~40 ms to
 * each; a keep-alive of 5 s so a lost broker is noticed within seconds; a
 * Unix socket for `unix://` URLs. MQTT.js's own reconnect brings the
 * connection back at a fixed short period, so a broker that returns within
 * `DISCONNECT_KILL_MS` is found in time.
 *
 * Given the nodes of a clustered broker, every closed connection (a lost
 * one, or a try that failed) moves the client to the next node, round
 * robin, as the Rust client's `Failover` does; MQTT.js's `servers` option
 * does not apply to a stream built here, so the rotation is done in the
 * stream builder. The period stays fixed: each node is tried within a
 * quarter second, a dead cluster once a quarter second.
 *
 * @module
 */

import net from 'node:net';
import { MqttClient } from 'mqtt';
import { log } from './log.js';

/** Task payloads (embedding batches) are large. */
const MAX_PACKET = 16 << 20;

/**
 * @param {ReturnType<import('./config.js').parseMqttUrl>[]} urls the broker's nodes, tried in turn
 * @param {string} clientId
 * @param {object} [extra] more MQTT.js options (a will, another keep-alive)
 * @returns {MqttClient} connecting already; `client.broker()` names the node it is pointed at
 */
export function connect(urls, clientId, extra = {}) {
  let at = 0;
  const stream = (client) => {
    const url = urls[at];
    // Credentials belong to each URL; MQTT.js reads them for every CONNECT.
    client.options.username = url.username;
    client.options.password = url.password;
    const socket = url.path
      ? net.createConnection({ path: url.path })
      : net.createConnection({ host: url.host, port: url.port });
    socket.setNoDelay(true);
    return socket;
  };
  const client = new MqttClient(stream, {
    protocolVersion: 5,
    clientId,
    clean: true,
    keepalive: 5,
    reconnectPeriod: 250,
    connectTimeout: 5_000,
    username: urls[0].username,
    password: urls[0].password,
    properties: { maximumPacketSize: MAX_PACKET },
    resubscribe: false,
    // A refused CONNECT is tried again like a lost connection (MQTT.js
    // would stop for good): the next node may accept it, and a refusal
    // that lasts is for the service to count (exit 78).
    reconnectOnConnackError: true,
    ...extra,
  });
  client.broker = () => urls[at].display;
  if (urls.length > 1) {
    client.on('close', () => {
      const from = urls[at].display;
      at = (at + 1) % urls.length;
      log.debug('trying the next broker node', { broker: urls[at].display, from, client_id: clientId });
    });
  }
  return client;
}
