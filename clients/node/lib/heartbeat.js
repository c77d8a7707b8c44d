/**
 * The retained heartbeat record of docs/DESIGN.md, published the way the
 * Rust runtime publishes it.
 *
 * A dedicated MQTT 5 connection (so the heartbeat keeps telling the truth
 * about the process even when the service's own connection is busy or gone)
 * publishes the record, retained, to
 * `axion/<pkg>/heartbeat/<service>/<host>:<port>`: every interval, at once on
 * every CONNACK (the embedded broker forgets retained messages when it
 * restarts), at once when anyone publishes to `axion/<pkg>/cmd/announce`,
 * at once when the service's own connection comes or goes, and at once when
 * someone else's record lands on this instance's topic (the late will of an
 * earlier run, or a janitor's clear). Its MQTT will is the same record with
 * `status: offline, reason: lost` and this run's `boot_id`, so a crash shows
 * at once. Every record carries MQTT 5 message expiry
 * (`HEARTBEAT_GHOST_SECS`) so a dead instance's record does not stay
 * retained forever.
 *
 * It runs on the sentinel thread and reads the live numbers from the shared
 * {@link Vitals}, so `last_progress_ts` keeps going out, frozen, while a
 * handler blocks the main thread: that is how an operator sees the stall.
 *
 * @module
 */

import fs from 'node:fs';
import { randomUUID } from 'node:crypto';
import { connect } from './connect.js';
import { log } from './log.js';
import { topics, sanitizeClientId } from './config.js';

/**
 * Keep-alive of the heartbeat connection: the broker fires the will of a
 * hung (SIGSTOPped, partitioned) instance after 1.5 × this.
 */
const HEARTBEAT_KEEP_ALIVE_SECS = 5;
/** Announces and corrections are answered at most this often. */
const MIN_REPUBLISH_GAP_MS = 500;
/** How long a stop waits for the DISCONNECT to leave after the offline record was acknowledged. */
const DISCONNECT_FLUSH_MS = 2_000;
/** How often the service's connection state is compared with the last one published. */
const SYNC_EVERY_MS = 200;
/** `/proc` counts CPU time and start times in USER_HZ, 100 on Linux. */
const USER_HZ = 100;

/** Who this process is and what it costs, from `/proc`; empty where there is none. */
class ProcessInfo {
  constructor() {
    this.stat = readStat();
    this.hostBootId = readTrimmed('/proc/sys/kernel/random/boot_id');
    const btime = /^btime (\d+)$/m.exec(readTrimmed('/proc/stat') ?? '');
    this.startedAt = this.stat && btime ? Number(btime[1]) + this.stat.startTicks / USER_HZ : undefined;
    this.last = null;
  }

  /** Percent of one core used since the previous call (or since the process started). */
  cpuPercent() {
    const stat = readStat();
    if (!stat || !this.stat || stat.startTicks !== this.stat.startTicks) return undefined;
    const now = Date.now() / 1000;
    let percent;
    if (this.last) {
      const secs = now - this.last.at;
      percent = secs <= 0 ? 0 : ((stat.cpuTicks - this.last.ticks) / USER_HZ / secs) * 100;
    } else {
      const lived = this.startedAt === undefined ? 0 : now - this.startedAt;
      percent = lived <= 0 ? 0 : (stat.cpuTicks / USER_HZ / lived) * 100;
    }
    this.last = { at: now, ticks: stat.cpuTicks };
    return percent;
  }
}

function readTrimmed(path) {
  try {
    return fs.readFileSync(path, 'utf8').trim() || undefined;
  } catch {
    return undefined;
  }
}

/**
 * `/proc/self/stat`: the command name (field 2) is in parentheses and may
 * hold spaces and `)`, so fields are counted after the last `)`.
 */
function readStat() {
  const raw = readTrimmed('/proc/self/stat');
  if (!raw) return undefined;
  const fields = raw.slice(raw.lastIndexOf(')') + 1).trim().split(/\s+/);
  const field = (n) => Number(fields[n - 3]);
  return { cpuTicks: field(14) + field(15), startTicks: field(22) };
}

export class Heartbeat {
  /**
   * @param {object} o
   * @param {ReturnType<import('./config.js').parseMqttUrl>[]} o.urls the broker's nodes
   * @param {string} o.pkg
   * @param {string} o.service
   * @param {string} o.host
   * @param {number} o.port the listening port, or the pid for an instance without one
   * @param {number} o.intervalSecs
   * @param {number} o.ghostSecs
   * @param {Record<string, unknown>} o.extras fields merged into every record
   * @param {import('./vitals.js').Vitals} o.vitals
   */
  constructor({ urls, pkg, service, host, port, intervalSecs, ghostSecs, extras, vitals }) {
    this.pkg = pkg;
    this.service = service;
    this.host = host;
    this.pid = process.pid;
    this.port = port;
    this.instanceId = `${host}:${port}`;
    this.topic = topics.heartbeat(pkg, service, this.instanceId);
    this.announceTopic = topics.announce(pkg);
    this.clientId = sanitizeClientId(`axion-hb-${service}-${host}-${port}`);
    this.bootId = randomUUID();
    this.started = Date.now();
    this.intervalSecs = intervalSecs;
    this.ghostSecs = ghostSecs;
    this.extras = extras;
    this.vitals = vitals;
    this.proc = new ProcessInfo();
    this.seq = 0;
    this.status = 'online';
    this.stopping = false;
    this.lastPublish = 0;
    this.deferred = null;
    this.client = connect(urls, this.clientId, {
      keepalive: HEARTBEAT_KEEP_ALIVE_SECS,
      will: this.#will(),
      properties: { maximumPacketSize: 1 << 20 },
    });
    this.client.on('connect', () => this.#onConnect());
    this.client.on('message', (topic, payload) => this.#onMessage(topic, payload));
    // The will for the next connection carries the latest numbers.
    this.client.on('close', () => {
      this.client.options.will = this.#will();
    });
    this.client.on('error', (err) => log.debug('heartbeat connection error', { topic: this.topic, error: err.message }));
    this.ticker = setInterval(() => this.#publish(), intervalSecs * 1000);
    this.seenConnected = vitals.connected;
    this.sync = setInterval(() => {
      const connected = this.vitals.connected;
      if (connected !== this.seenConnected) {
        this.seenConnected = connected;
        this.#publish();
      }
    }, SYNC_EVERY_MS);
    log.info('heartbeat starting', { topic: this.topic, boot_id: this.bootId, broker: urls.map((u) => u.display).join(',') });
  }

  /** Whether the heartbeat's own connection is up: a final record can land. */
  get publishing() {
    return this.client.connected;
  }

  record(status, reason, seq) {
    const v = this.vitals;
    const rec = {
      service: this.service,
      instance_id: this.instanceId,
      hostname: this.host,
      port: this.port,
      package: this.pkg,
      pid: this.pid,
      uptime_seconds: Math.floor((Date.now() - this.started) / 1000),
      timestamp: Date.now() / 1000,
      status,
      reason,
      boot_id: this.bootId,
      seq,
      interval_secs: this.intervalSecs,
      connected: v.connected,
      queue_depth: v.waiting,
      inflight: v.running,
      last_progress_ts: v.lastProgressTs ?? undefined,
      avg_job_ms: v.avgJobMs ?? undefined,
      cpu_percent: this.proc.cpuPercent(),
      memory_bytes: process.memoryUsage.rss(),
      started_at: this.proc.startedAt,
      proc_start_ticks: this.proc.stat?.startTicks,
      host_boot_id: this.proc.stat ? this.proc.hostBootId : undefined,
      ...this.extras,
    };
    return JSON.stringify(rec);
  }

  #properties() {
    return {
      payloadFormatIndicator: true,
      messageExpiryInterval: this.ghostSecs,
      contentType: 'application/json',
    };
  }

  #will() {
    return {
      topic: this.topic,
      payload: Buffer.from(this.record('offline', 'lost', this.seq)),
      qos: 1,
      retain: true,
      properties: this.#properties(),
    };
  }

  #onConnect() {
    // Clean start: the broker remembers no subscription.
    this.client.subscribe([this.announceTopic, topics.announceFleet, this.topic], { qos: 1 }, (err) => {
      if (err) log.warn('heartbeat subscribe failed', { topic: this.topic, error: err.message });
    });
    this.#publish();
  }

  #onMessage(topic, payload) {
    if (this.stopping) return;
    if (topic === this.announceTopic || topic === topics.announceFleet || (topic === this.topic && this.#needsCorrection(payload))) {
      this.#republishSoon();
    }
  }

  /** Whether a record seen on our own topic must be replaced by ours. */
  #needsCorrection(payload) {
    if (payload.length === 0) return true;
    try {
      const hb = JSON.parse(payload.toString());
      return hb.boot_id !== this.bootId || hb.status === 'offline';
    } catch {
      return true;
    }
  }

  #republishSoon() {
    const since = Date.now() - this.lastPublish;
    if (since >= MIN_REPUBLISH_GAP_MS) {
      this.#publish();
    } else if (!this.deferred) {
      this.deferred = setTimeout(() => {
        this.deferred = null;
        this.#publish();
      }, MIN_REPUBLISH_GAP_MS - since);
    }
  }

  #publish() {
    if (this.stopping || !this.client.connected) return;
    this.seq += 1;
    this.lastPublish = Date.now();
    this.client.publish(
      this.topic,
      this.record(this.status, undefined, this.seq),
      { qos: 1, retain: true, properties: this.#properties() },
      (err) => {
        if (err) log.warn('heartbeat publish failed', { topic: this.topic, error: err.message });
      },
    );
  }

  /** Switches to `draining` and publishes it at once. */
  draining() {
    this.status = 'draining';
    this.#publish();
  }

  /**
   * Publishes `offline` with `reason` (`stopped` for a clean stop), waits at
   * most `waitMs` for the broker's PUBACK, then disconnects cleanly, so the
   * broker does not publish the will (`lost`) over it.
   *
   * @returns {Promise<boolean>} whether the record was acknowledged
   */
  async stop(reason, waitMs) {
    this.stopping = true;
    this.status = 'offline';
    clearInterval(this.ticker);
    clearInterval(this.sync);
    clearTimeout(this.deferred);
    if (!this.client.connected) {
      this.client.end(true);
      return false;
    }
    this.seq += 1;
    const acked = await new Promise((resolve) => {
      const timer = setTimeout(() => resolve(false), waitMs);
      this.client.publish(
        this.topic,
        this.record('offline', reason, this.seq),
        { qos: 1, retain: true, properties: this.#properties() },
        (err) => {
          clearTimeout(timer);
          resolve(!err);
        },
      );
    });
    await new Promise((resolve) => {
      const timer = setTimeout(resolve, DISCONNECT_FLUSH_MS);
      this.client.end(!acked, () => {
        clearTimeout(timer);
        resolve();
      });
    });
    if (acked) {
      log.info('heartbeat stopped', { topic: this.topic, reason });
    } else {
      log.warn('offline record not acknowledged before disconnect', { topic: this.topic, reason });
    }
    return acked;
  }
}
