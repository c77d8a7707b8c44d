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
 * @module
 */

import net from 'node:net';
import { MqttClient } from 'mqtt';

/** Task payloads (embedding batches) are large. */
const MAX_PACKET = 16 << 20;

/**
 * @param {ReturnType<import('./config.js').parseMqttUrl>} url
 * @param {string} clientId
 * @param {object} [extra] more MQTT.js options (a will, another keep-alive)
 * @returns {MqttClient} connecting already
 */
export function connect(url, clientId, extra = {}) {
  const stream = () => {
    const socket = url.path
      ? net.createConnection({ path: url.path })
      : net.createConnection({ host: url.host, port: url.port });
    socket.setNoDelay(true);
    return socket;
  };
  return new MqttClient(stream, {
    protocolVersion: 5,
    clientId,
    clean: true,
    keepalive: 5,
    reconnectPeriod: 250,
    connectTimeout: 5_000,
    username: url.username,
    password: url.password,
    properties: { maximumPacketSize: MAX_PACKET },
    resubscribe: false,
    ...extra,
  });
}
