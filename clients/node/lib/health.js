/**
 * Optional `/health/live` and `/health/ready` (`HEALTH_LISTEN`), for
 * supervisors and load balancers that probe over HTTP.
 *
 * Live answers 200 while neither watchdog rule is close to firing; ready
 * answers 200 only when the service is connected, subscribed, not draining
 * and below its admission limits. Both carry the numbers as JSON. The
 * server runs on the main thread on purpose: a service too stuck to answer
 * a probe is not live.
 *
 * @module
 */

import http from 'node:http';
import { ConfigError } from './config.js';

/** Parses `HEALTH_LISTEN` (`127.0.0.1:9400`, `[::1]:9400`). */
export function parseListen(value) {
  const m = /^\[?([^\]]*)\]?:(\d+)$/.exec(value.trim());
  if (!m || m[1] === '' || Number(m[2]) > 65535) {
    throw new ConfigError(`HEALTH_LISTEN=${JSON.stringify(value)} is not an address like 127.0.0.1:9400`);
  }
  return { host: m[1], port: Number(m[2]) };
}

/**
 * Binds `addr` and serves the probes until the process ends.
 *
 * @returns {Promise<number>} the bound port (so port 0 works)
 */
export function serveHealth(addr, vitals, limits) {
  const body = () => ({
    connected: vitals.connected,
    draining: vitals.draining,
    inflight: vitals.running,
    queue_depth: vitals.waiting,
    disconnected_ms: vitals.disconnectedForMs(),
    stalled_ms: vitals.stalledForMs(),
  });
  const server = http.createServer((req, res) => {
    let ok;
    if (req.url === '/health/live') {
      const lost = (vitals.disconnectedForMs() ?? 0) > limits.disconnectKillMs;
      const stalled = (vitals.stalledForMs() ?? 0) > limits.livenessMaxStallMs;
      ok = !lost && !stalled;
    } else if (req.url === '/health/ready') {
      ok =
        vitals.connected &&
        vitals.subscribed &&
        !vitals.draining &&
        vitals.running + vitals.waiting < limits.maxInflight + limits.maxQueue;
    } else {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(ok ? 200 : 503, { 'content-type': 'application/json' }).end(JSON.stringify(body()));
  });
  return new Promise((resolve, reject) => {
    server.once('error', (err) =>
      reject(new ConfigError(`cannot listen for health probes on ${addr.host}:${addr.port}: ${err.message}`)));
    server.listen(addr.port, addr.host, () => {
      server.unref();
      resolve(server.address().port);
    });
  });
}
