/**
 * What the package's end-to-end tests share: a real `axion serve` on free
 * ports with its own temp data directory, services as child processes, and
 * a plain MQTT.js client to watch what a user would watch.
 *
 * The binary is `AXION_BIN`, or `target/debug/axion` under the repository
 * root (`scripts/test.sh` builds it first).
 */

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import mqtt from 'mqtt';

const here = path.dirname(fileURLToPath(import.meta.url));
const repoRoot = path.resolve(here, '../../..');
export const EXAMPLE = path.resolve(here, '../examples/embedding-worker.js');
export const PRODUCER = path.resolve(here, 'producer.js');
/** The worker (or producer) of the cross-language test; see the file. */
export const XL_SERVICE = path.resolve(here, 'xl-service.js');
export const QUEUE = 'embedding.generate';

export function axionBin() {
  return process.env.AXION_BIN ?? path.join(repoRoot, 'target/debug/axion');
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

function canConnect(port) {
  return new Promise((resolve) => {
    const s = net.connect({ port, host: '127.0.0.1' }, () => {
      s.destroy();
      resolve(true);
    });
    s.on('error', () => resolve(false));
  });
}

/** Resolves with the exit code (or the signal's name) once `child` has exited. */
function exited(child) {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) resolve(child.exitCode ?? child.signalCode);
    else child.once('exit', (code, signal) => resolve(code ?? signal));
  });
}

/** `axion serve` on free ports; `kill()` in an `after` hook. */
export class Serve {
  static async start(args = []) {
    const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'axion-node-'));
    for (let attempt = 0; attempt < 3; attempt++) {
      const s = new Serve(dataDir, await freePort(), await freePort(), args);
      if (await s.ready()) return s;
      s.kill();
    }
    throw new Error(`axion serve did not listen three times; its log:\n${fs.readFileSync(path.join(dataDir, 'serve.log'), 'utf8')}`);
  }

  constructor(dataDir, mqttPort, wsPort, args) {
    Object.assign(this, { dataDir, mqttPort, wsPort, args });
    this.url = `mqtt://127.0.0.1:${mqttPort}`;
    this.#spawn();
  }

  #spawn() {
    const log = fs.openSync(path.join(this.dataDir, 'serve.log'), 'a');
    this.proc = spawn(
      axionBin(),
      ['serve', '--mqtt-listen', `127.0.0.1:${this.mqttPort}`, '--ws-listen', `127.0.0.1:${this.wsPort}`,
        '--data-dir', this.dataDir, ...this.args],
      { stdio: ['ignore', 'ignore', log], env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'warn' } },
    );
    fs.closeSync(log);
    this.exited = exited(this.proc);
  }

  /** Whether both ports listen while the process runs (a taken port makes it exit). */
  async ready() {
    let gone = false;
    this.exited.then(() => { gone = true; });
    const deadline = Date.now() + 20_000;
    for (const port of [this.mqttPort, this.wsPort]) {
      while (!(await canConnect(port))) {
        if (gone || Date.now() > deadline) return false;
        await new Promise((r) => setTimeout(r, 20));
      }
    }
    return !gone;
  }

  /** kill -9, as a crash or an OOM kill would. */
  async kill() {
    this.proc.kill('SIGKILL');
    await this.exited;
  }

  /** Starts again on the same ports and data directory (after a kill). */
  async restart() {
    this.#spawn();
    if (!(await this.ready())) {
      throw new Error(`axion serve did not come back; its log:\n${fs.readFileSync(path.join(this.dataDir, 'serve.log'), 'utf8')}`);
    }
  }

  cleanup() {
    this.proc.kill('SIGKILL');
    fs.rmSync(this.dataDir, { recursive: true, force: true });
  }
}

/** A service (a Node script) as a child process, its stderr kept for a failure message. */
export class ServiceProc {
  constructor(script, serve, env = {}) {
    this.stderr = '';
    this.proc = spawn(process.execPath, [script], {
      stdio: ['ignore', 'ignore', 'pipe'],
      env: { ...process.env, AXION_MQTT_URL: serve.url, AXION_LOG: 'info', ...env },
    });
    this.proc.stderr.on('data', (d) => { this.stderr += d; });
    this.pid = this.proc.pid;
    this.exited = exited(this.proc);
  }

  signal(sig) {
    this.proc.kill(sig);
  }

  /** The exit code, or throws (with the service's log) when it is still running after `ms`. */
  async exitWithin(ms) {
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`service still running after ${ms} ms; its log:\n${this.stderr}`)), ms);
    });
    try {
      return await Promise.race([this.exited, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  kill() {
    this.proc.kill('SIGKILL');
  }
}

/** A plain MQTT.js client that keeps what it receives until a test asks for it. */
export class Watcher {
  static async connect(serve, filters = []) {
    const client = await mqtt.connectAsync(serve.url, {
      protocolVersion: 5,
      clientId: `t-${process.pid}-${Math.random().toString(16).slice(2)}`,
      reconnectPeriod: 0,
    });
    const w = new Watcher(client);
    if (filters.length > 0) await client.subscribeAsync(filters, { qos: 1 });
    return w;
  }

  constructor(client) {
    this.client = client;
    this.messages = [];
    this.waiters = new Set();
    client.on('message', (topic, payload, packet) => {
      let json = null;
      try {
        json = payload.length > 0 ? JSON.parse(payload.toString()) : null;
      } catch {
        json = payload.toString();
      }
      this.messages.push({ topic, json, packet, at: Date.now() });
      for (const w of this.waiters) w();
    });
  }

  /**
   * The first message (received already, or later) for which `pred(topic,
   * json)` holds; consumed so that it is returned only once.
   */
  next(pred, ms = 10_000, what = 'a matching message') {
    return new Promise((resolve, reject) => {
      const look = () => {
        const i = this.messages.findIndex((m) => m.json !== null && pred(m.topic, m.json));
        if (i < 0) return false;
        const [m] = this.messages.splice(i, 1);
        clearTimeout(timer);
        this.waiters.delete(look);
        resolve(m.json);
        return true;
      };
      const timer = setTimeout(() => {
        this.waiters.delete(look);
        reject(new Error(`no ${what} within ${ms} ms`));
      }, ms);
      if (!look()) this.waiters.add(look);
    });
  }

  /** The next heartbeat record of the embedding service for which `pred` holds. */
  heartbeat(pred, ms = 10_000, what = 'matching heartbeat') {
    return this.next((t, hb) => t.startsWith('axion/default/heartbeat/embedding/') && pred(hb), ms, what);
  }

  /** Publishes a task request on `queue` (QoS 1). */
  enqueue(queue, body) {
    return this.client.publishAsync(`axion/default/queue/${queue}/enqueue`, JSON.stringify(body), { qos: 1 });
  }

  /** Publishes an event envelope (QoS 1). */
  request(type, body) {
    return this.client.publishAsync(`axion/default/event/${type.replaceAll('.', '/')}`, JSON.stringify({ type, ...body }), { qos: 1 });
  }

  /** The queue owner's view of `queue` (`show` over the ops topic). */
  async show(queue) {
    const reply = `t/show/${Math.random().toString(16).slice(2)}`;
    await this.client.subscribeAsync(reply, { qos: 1 });
    await this.client.publishAsync(`axion/default/queue/${queue}/cmd`, JSON.stringify({ op: 'show', replyTo: reply }), { qos: 1 });
    return this.next((t) => t === reply, 5_000, `show reply for ${queue}`);
  }

  close() {
    return this.client.endAsync(true);
  }
}

/**
 * Starts a service script and waits until its retained heartbeat says its
 * own connection is up (it subscribes and announces credit right then; a
 * task enqueued earlier waits in the queue anyway).
 */
export async function startService(serve, script, service, env = {}) {
  const w = await Watcher.connect(serve, [`axion/default/heartbeat/${service}/+`]);
  const svc = new ServiceProc(script, serve, { HEARTBEAT_INTERVAL_SECS: '1', ...env });
  try {
    await w.next((t, hb) => hb.pid === svc.pid && hb.connected === true && hb.status === 'online', 15_000,
      `online heartbeat of ${service} (pid ${svc.pid})`);
  } catch (err) {
    svc.kill();
    throw new Error(`${err.message}; its log:\n${svc.stderr}`);
  } finally {
    await w.close();
  }
  return svc;
}

/** The example embedding worker, started as by {@link startService}. */
export function startExample(serve, env = {}) {
  return startService(serve, EXAMPLE, 'embedding', env);
}
