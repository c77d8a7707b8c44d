/**
 * What a service is configured with, read the way the Rust runtime reads
 * it: the same environment variables, defaults, checks and names, so an
 * operator tunes a Node service exactly as a Rust one (docs/DESIGN.md
 * "Defaults" and "Exit codes of the service runtime").
 *
 * @module
 */

import os from 'node:os';

/** Exit code of a clean stop (after draining). */
export const EXIT_OK = 0;
/** Exit code for a start-up failure other than configuration. */
export const EXIT_FAILURE = 1;
/** Exit code when the broker stayed unreachable longer than `DISCONNECT_KILL_MS`. */
export const EXIT_BROKER_LOST = 70;
/** Exit code when pending work made no progress for `LIVENESS_MAX_STALL_MS`. */
export const EXIT_STALLED = 71;
/** Exit code when the service cannot start as configured (sysexits EX_CONFIG). */
export const EXIT_CONFIG = 78;

export const DEFAULT_MQTT_URL = 'mqtt://127.0.0.1:1883';
export const DEFAULT_PACKAGE = 'default';

/** A configuration the service cannot run with; it exits with 78. */
export class ConfigError extends Error {
  constructor(message) {
    super(message);
    this.name = 'ConfigError';
  }
}

/** An environment variable, or `fallback` when unset or blank. */
export function envOr(name, fallback) {
  const v = process.env[name];
  return v !== undefined && v.trim() !== '' ? v.trim() : fallback;
}

/**
 * A yes/no switch from the environment, read as the Rust runtime reads it:
 * `1`/`true` yes, `0`/`false`, unset or blank no; anything else is a
 * configuration error.
 */
export function envFlag(name) {
  const v = (process.env[name] ?? '').trim().toLowerCase();
  if (v === '' || v === '0' || v === 'false') return false;
  if (v === '1' || v === 'true') return true;
  throw new ConfigError(`environment variable ${name}=${JSON.stringify(v)} is not 1, true, 0 or false`);
}

/** A whole number from the environment, `fallback` when unset. */
export function envNum(name, fallback) {
  const v = process.env[name];
  if (v === undefined || v.trim() === '') return fallback;
  if (!/^\d+$/.test(v.trim())) {
    throw new ConfigError(`environment variable ${name}=${JSON.stringify(v)} is not a whole number`);
  }
  return Number(v.trim());
}

/**
 * How much work a service takes and how quickly it gives up: the defaults,
 * overridden by `MAX_INFLIGHT`, `MAX_QUEUE`, `DISCONNECT_KILL_MS`,
 * `LIVENESS_MAX_STALL_MS`, `DRAIN_MS`, `WATCHDOG_INTERVAL_MS`,
 * `AXION_QUEUE_ACK_WAIT_MS`, `HEARTBEAT_INTERVAL_SECS` and
 * `HEARTBEAT_GHOST_SECS`.
 */
export function limitsFromEnv() {
  const limits = {
    /** Handlers running at once; also the queue credit. */
    maxInflight: envNum('MAX_INFLIGHT', 8),
    /** Requests waiting for a slot; beyond it a request is answered `overloaded` at once. */
    maxQueue: envNum('MAX_QUEUE', 256),
    disconnectKillMs: envNum('DISCONNECT_KILL_MS', 10_000),
    livenessMaxStallMs: envNum('LIVENESS_MAX_STALL_MS', 30_000),
    /** How long SIGTERM waits for running handlers before handing their tasks back. */
    drainMs: envNum('DRAIN_MS', 5_000),
    /** Small against the kill thresholds so an exit lands well within "threshold + 1 s". */
    watchdogIntervalMs: envNum('WATCHDOG_INTERVAL_MS', 250),
    /** The queue owner's ack wait; `progress` goes out every third of it while a task is held. */
    ackWaitMs: envNum('AXION_QUEUE_ACK_WAIT_MS', 30_000),
    heartbeatIntervalSecs: Math.max(1, envNum('HEARTBEAT_INTERVAL_SECS', 15)),
    /** MQTT 5 message expiry of every heartbeat record: how long a dead instance's record stays retained. */
    heartbeatGhostSecs: envNum('HEARTBEAT_GHOST_SECS', 3600),
  };
  if (limits.maxInflight === 0) throw new ConfigError('MAX_INFLIGHT must be at least 1');
  if (limits.watchdogIntervalMs === 0) throw new ConfigError('WATCHDOG_INTERVAL_MS must be at least 1');
  if (limits.disconnectKillMs === 0 || limits.livenessMaxStallMs === 0) {
    throw new ConfigError('DISCONNECT_KILL_MS/LIVENESS_MAX_STALL_MS must be at least 1');
  }
  if (limits.ackWaitMs < 30) throw new ConfigError('AXION_QUEUE_ACK_WAIT_MS must be at least 30');
  return limits;
}

/**
 * Checks one topic level (package, service, queue, host): not empty, and
 * no `/`, `+`, `#` or NUL.
 */
export function validateLevel(what, value) {
  if (typeof value !== 'string' || value === '') throw new ConfigError(`${what} must not be empty`);
  if (/[/+#\0]/.test(value)) {
    throw new ConfigError(`${what} ${JSON.stringify(value)} must not contain '/', '+', '#' or NUL`);
  }
}

/** Dot-separated non-empty segments without `/`; `+` and `#` only as whole segments, `#` last. */
export function validateEventType(t) {
  const segs = typeof t === 'string' ? t.split('.') : [];
  const ok =
    segs.length > 0 &&
    !/[/\0]/.test(t) &&
    segs.every(
      (seg, i) =>
        seg !== '' &&
        (!/[+#]/.test(seg) || seg === '+' || seg === '#') &&
        (seg !== '#' || i === segs.length - 1),
    );
  if (!ok) {
    throw new ConfigError(
      `event type ${JSON.stringify(t)} must be dot-separated non-empty segments without '/' ('+' and '#' only as whole segments)`,
    );
  }
}

/**
 * A parsed `mqtt://[user[:password]@]host[:port]` (or `tcp://`) or
 * `unix://[user[:password]@]/path` URL; user and password come from
 * `AXION_MQTT_USER`/`AXION_MQTT_PASSWORD` when the URL carries none.
 *
 * @returns {{host?: string, port?: number, path?: string, username?: string, password?: string, display: string}}
 */
export function parseMqttUrl(url) {
  const credentials = (creds) => {
    if (creds === undefined) return {};
    const colon = creds.indexOf(':');
    return colon < 0
      ? { username: creds }
      : { username: creds.slice(0, colon), password: creds.slice(colon + 1) };
  };
  let parsed;
  if (url.startsWith('unix://')) {
    const rest = url.slice('unix://'.length);
    const at = rest.indexOf('@/');
    const path = at < 0 ? rest : rest.slice(at + 1);
    if (!path.startsWith('/') || path.length < 2) {
      throw new ConfigError(
        `broker URL ${JSON.stringify(url)} must name an absolute socket path, as in unix:///run/axion/mqtt.sock`,
      );
    }
    parsed = { path, ...credentials(at < 0 ? undefined : rest.slice(0, at)) };
  } else {
    const scheme = ['mqtt://', 'tcp://'].find((s) => url.startsWith(s));
    if (!scheme) {
      throw new ConfigError(
        `broker URL ${JSON.stringify(url)} must start with mqtt:// (or tcp://, or unix:// for a Unix socket)`,
      );
    }
    const rest = url.slice(scheme.length).replace(/\/+$/, '');
    const at = rest.lastIndexOf('@');
    const hostport = at < 0 ? rest : rest.slice(at + 1);
    let host = hostport;
    let port = 1883;
    const colon = hostport.lastIndexOf(':');
    if (colon >= 0 && !hostport.endsWith(']')) {
      const p = hostport.slice(colon + 1);
      if (!/^\d+$/.test(p) || Number(p) > 65535) {
        throw new ConfigError(`broker URL ${JSON.stringify(url)} has an invalid port ${JSON.stringify(p)}`);
      }
      host = hostport.slice(0, colon);
      port = Number(p);
    }
    host = host.replace(/^\[/, '').replace(/\]$/, '');
    if (host === '') throw new ConfigError(`broker URL ${JSON.stringify(url)} has no host`);
    parsed = { host, port, ...credentials(at < 0 ? undefined : rest.slice(0, at)) };
  }
  if (parsed.username === undefined && process.env.AXION_MQTT_USER) {
    parsed.username = process.env.AXION_MQTT_USER;
  }
  if (parsed.password === undefined && process.env.AXION_MQTT_PASSWORD !== undefined) {
    parsed.password = process.env.AXION_MQTT_PASSWORD;
  }
  // The password never reaches a log line.
  const user = parsed.username !== undefined ? `${parsed.username}@` : '';
  parsed.display = parsed.path ? `unix://${user}${parsed.path}` : `mqtt://${user}${parsed.host}:${parsed.port}`;
  return parsed;
}

/**
 * The brokers a service may reach, in the order it tries them: one URL, or
 * the nodes of a clustered broker comma-separated
 * (`mqtt://a:1883,mqtt://b:1883`), each parsed by {@link parseMqttUrl}; a
 * bad entry is named by its position.
 *
 * @returns {ReturnType<typeof parseMqttUrl>[]} never empty
 */
export function parseBrokerUrls(text) {
  const entries = text.split(',').map((e) => e.trim());
  if (entries.length === 1) {
    if (entries[0] === '') throw new ConfigError('no broker URL given');
    return [parseMqttUrl(entries[0])];
  }
  return entries.map((entry, i) => {
    if (entry === '') {
      throw new ConfigError(
        `the broker URL list has an empty entry (entry ${i + 1}); separate URLs with single commas`,
      );
    }
    try {
      return parseMqttUrl(entry);
    } catch (err) {
      throw new ConfigError(`entry ${i + 1} of the broker URL list: ${err.message}`);
    }
  });
}

/**
 * A client id the broker accepts: rumqttd's listener dies on `/ + # $` in
 * a client id, so anything outside a safe set becomes `_`.
 */
export function sanitizeClientId(raw) {
  return raw.replace(/[^A-Za-z0-9\-_.:]/g, '_');
}

/** This machine's hostname, as the heartbeat reports it. */
export function localHostname() {
  return os.hostname();
}

export const topics = {
  heartbeat: (pkg, service, instanceId) => `axion/${pkg}/heartbeat/${service}/${instanceId}`,
  announce: (pkg) => `axion/${pkg}/cmd/announce`,
  /** Asks every instance of every package to republish its heartbeat (`axion monitor` on connect). */
  announceFleet: 'axion/cmd/announce',
  event: (pkg, eventType) => `axion/${pkg}/event/${eventType.replaceAll('.', '/')}`,
  queue: (pkg, queue, leaf) => `axion/${pkg}/queue/${queue}/${leaf}`,
  /** One shared group per queue: rumqttd keys shared groups by name alone. */
  queueTasksShared: (pkg, queue) => `$share/${pkg}.${queue}/axion/${pkg}/queue/${queue}/tasks`,
  /** A worker's own tasks, by directed delivery (a broker without shared subscriptions). */
  queueTasksDirected: (pkg, queue, worker) => `axion/${pkg}/queue/${queue}/tasks/${worker}`,
  reply: (pkg, clientId) => `axion/${pkg}/reply/${clientId}`,
};

/** Whether `topic` matches the MQTT filter `filter` (`+` and `#` wildcards). */
export function topicMatches(topic, filter) {
  const t = topic.split('/');
  const f = filter.split('/');
  for (let i = 0; i < f.length; i++) {
    if (f[i] === '#') return true;
    if (i >= t.length) return false;
    if (f[i] !== '+' && f[i] !== t[i]) return false;
  }
  return t.length === f.length;
}
