/**
 * The service runtime for Node: the Rust runtime's `Service`, over MQTT.js.
 *
 * A service built on this module connects (MQTT 5), serves its queues
 * through the credit protocol of `bridge/QUEUE-CONTRACT.md` and its event
 * topics, publishes the retained heartbeat with live load, refuses work
 * beyond its limits at once, drains on SIGTERM, and exits with a distinct
 * code when the broker is gone (70) or its work stopped moving (71), so the
 * supervisor restarts it. The heartbeat and the watchdog run on a thread of
 * their own (`sentinel.js`), because the failure they exist for includes a
 * main thread that runs nothing else any more.
 *
 * Credit follows free capacity: each queue is told it may send as many
 * tasks as there are free handler slots (`MAX_INFLIGHT` minus running
 * minus waiting), and a task that another shared-group member's credit
 * brought is claimed only into a free slot, otherwise released at once, so
 * a busy instance never sits on work another could do.
 *
 * @module
 */

import { Worker } from 'node:worker_threads';
import { randomUUID } from 'node:crypto';
import {
  ConfigError,
  DEFAULT_MQTT_URL,
  DEFAULT_PACKAGE,
  EXIT_CONFIG,
  EXIT_FAILURE,
  EXIT_OK,
  envFlag,
  envOr,
  limitsFromEnv,
  localHostname,
  parseBrokerUrls,
  sanitizeClientId,
  topicMatches,
  topics,
  validateEventType,
  validateLevel,
} from './config.js';
import { connect } from './connect.js';
import { parseListen, serveHealth } from './health.js';
import { log } from './log.js';
import { Event, Task, envelope, parseEvent, resolveReply } from './message.js';
import { Vitals } from './vitals.js';

/** How often the dispatcher looks at the drain and at held tasks' ack wait. */
const TICK_MS = 20;
/** How long the final releases and acks may take to leave. */
const FINAL_FLUSH_MS = 2_000;
/** How long the clean stop waits for the `offline`/`stopped` PUBACK. */
const FINAL_HEARTBEAT_WAIT_MS = 5_000;
/** `retry_after_ms` bounds and the guess before any job has finished. */
const RETRY_AFTER_MIN_MS = 50;
const RETRY_AFTER_MAX_MS = 60_000;
const RETRY_AFTER_UNKNOWN_MS = 250;
/** Weight of the newest job in the duration average behind `retry_after_ms` and `avg_job_ms`. */
const AVG_WEIGHT = 0.2;
/** How long `enqueue` waits for the queue owner's confirmation. */
const ENQUEUE_TIMEOUT_MS = 10_000;

/** The reason a handler gave for failing: an Error's message, or the value itself. */
function reasonOf(err) {
  if (err instanceof Error) return err.message || err.name;
  return typeof err === 'string' ? err : JSON.stringify(err) ?? String(err);
}

export class Service {
  /**
   * @param {string} name the service name: a topic level of the heartbeat
   * @param {{package?: string, mqtt?: string, healthListen?: string, directedDelivery?: boolean}} [options]
   *   unset values come from `AXION_PACKAGE`, `AXION_MQTT_URL`,
   *   `HEALTH_LISTEN` (`/health/live` and `/health/ready` on that address;
   *   its port then names the instance instead of the pid) and
   *   `AXION_DIRECTED_DELIVERY` (tasks on this worker's own topic instead
   *   of the shared subscription, for brokers whose shared subscriptions do
   *   not span the cluster; a node whose CONNACK says it has none switches
   *   on its own)
   */
  constructor(name, options = {}) {
    this.name = name;
    this.options = options;
    this.queues = new Map();
    this.events = [];
    this.started = false;
  }

  /**
   * Serves queue `name`: each task goes to `handler`; what it returns (or
   * resolves to) acks the task and is published to the task's `replyTo`;
   * a throw or rejection fails the attempt, and the queue retries it.
   */
  queue(name, handler) {
    this.#mustNotRun();
    if (this.queues.has(name)) throw new ConfigError(`queue ${JSON.stringify(name)} has two handlers`);
    this.queues.set(name, handler);
    return this;
  }

  /**
   * Handles events of `type` (`fs.change`, or with `+`/`#` segments). When
   * an event carries `replyTo`, the result (or `{"error"}`) is published
   * there.
   */
  event(type, handler) {
    this.#mustNotRun();
    this.events.push({ type, handler });
    return this;
  }

  /**
   * Publishes an event envelope of `type` (QoS 1); resolves once the broker
   * has it.
   */
  async publish(type, payload, { replyTo, correlationId } = {}) {
    validateEventType(type);
    if (/[+#]/.test(type)) throw new ConfigError(`cannot publish to a wildcard event type ${JSON.stringify(type)}`);
    const engine = await this.#running();
    await engine.client.publishAsync(
      topics.event(engine.pkg, type),
      envelope(type, this.name, payload, correlationId, replyTo),
      { qos: 1 },
    );
  }

  /**
   * Enqueues a task on `queue` and resolves once the queue owner confirms
   * it is on disk: `{id, queue, duplicate?}`. Rejects with the owner's
   * `error` when it refuses the task (a full queue), or when no
   * confirmation comes within `timeoutMs`.
   *
   * @param {string} queue
   * @param {unknown} payload
   * @param {{id?: string, replyTo?: string, correlationId?: string, maxAttempts?: number, delayMs?: number, timeoutMs?: number}} [options]
   */
  async enqueue(queue, payload, options = {}) {
    validateLevel('queue', queue);
    const { timeoutMs = ENQUEUE_TIMEOUT_MS, ...fields } = options;
    const engine = await this.#running();
    return engine.request(topics.queue(engine.pkg, queue, 'enqueue'), { payload, ...fields }, timeoutMs);
  }

  /**
   * Runs the service until SIGTERM/SIGINT, then drains and exits the
   * process with 0. The sentinel thread exits it with 70 (broker lost) or
   * 71 (stalled); a configuration error exits with 78, any other start-up
   * failure with 1. Never resolves.
   *
   * @returns {Promise<never>}
   */
  async run() {
    this.#mustNotRun();
    this.started = true;
    let plan;
    try {
      plan = this.#plan();
    } catch (err) {
      log.error('service cannot run', { service: this.name, error: err.message });
      process.exit(err instanceof ConfigError ? EXIT_CONFIG : EXIT_FAILURE);
    }
    this.engine = new Engine(plan);
    this.engineStarted = this.engine.start().catch((err) => {
      log.error('service cannot start', { service: this.name, error: err.message });
      process.exit(err instanceof ConfigError ? EXIT_CONFIG : EXIT_FAILURE);
    });
    await this.engineStarted;
    return new Promise(() => {});
  }

  #mustNotRun() {
    if (this.started) throw new Error('the service is already running');
  }

  async #running() {
    if (!this.engine) throw new Error('the service is not running: call run() first');
    await this.engineStarted;
    return this.engine;
  }

  #plan() {
    const pkg = this.options.package ?? envOr('AXION_PACKAGE', DEFAULT_PACKAGE);
    const urls = parseBrokerUrls(this.options.mqtt ?? envOr('AXION_MQTT_URL', DEFAULT_MQTT_URL));
    const limits = limitsFromEnv();
    const directed = this.options.directedDelivery ?? envFlag('AXION_DIRECTED_DELIVERY');
    validateLevel('package', pkg);
    validateLevel('service', this.name);
    if (this.queues.size === 0 && this.events.length === 0) {
      throw new ConfigError('a service needs at least one queue or event handler');
    }
    for (const q of this.queues.keys()) validateLevel('queue', q);
    for (const { type } of this.events) validateEventType(type);
    const host = localHostname();
    validateLevel('host', host);
    const listen = this.options.healthListen ?? envOr('HEALTH_LISTEN', '');
    return {
      health: listen === '' ? null : parseListen(listen),
      service: this.name,
      pkg,
      urls,
      limits,
      host,
      directed,
      queues: this.queues,
      events: this.events.map(({ type, handler }) => ({ type, filter: topics.event(pkg, type), handler })),
    };
  }
}

/** Lasting refusals in a row a service takes before it gives up, at least (the Rust runtime's). */
const REFUSALS_BEFORE_GIVING_UP = 3;
/**
 * CONNACK reason codes that will repeat: unsupported protocol, client id
 * not valid, bad user name or password, not authorized, banned, bad
 * authentication method, topic name invalid, packet too large, payload
 * format invalid, retain or QoS not supported.
 */
const LASTING_CONNACK = new Set([0x84, 0x85, 0x86, 0x87, 0x8a, 0x8c, 0x90, 0x95, 0x99, 0x9a, 0x9b]);
/**
 * DISCONNECT reason codes that will repeat: malformed packet, protocol
 * error, not authorized, topic filter or name invalid, topic alias invalid,
 * packet too large, payload format invalid, retain or QoS not supported,
 * shared subscriptions, subscription identifiers or wildcard subscriptions
 * not supported.
 */
const LASTING_DISCONNECT = new Set([0x81, 0x82, 0x87, 0x8f, 0x90, 0x94, 0x95, 0x99, 0x9a, 0x9b, 0x9e, 0xa1, 0xa2]);
/** SUBACK reason codes that refuse a filter for good. */
const LASTING_SUBACK = new Set([0x87, 0x8f, 0x9e, 0xa1, 0xa2]);

/** The running service: one connection, the queue protocol, admission control and the drain. */
class Engine {
  constructor(plan) {
    Object.assign(this, plan);
    /** Directed delivery asked for whatever the broker offers. */
    this.forceDirected = plan.directed;
    this.vitals = new Vitals();
    this.connected = false;
    this.drainDeadline = null;
    /** Set once the drain is over and the stop sequence runs. */
    this.stopping = false;
    /** Whether the broker confirmed (UNSUBACK) that the drain left the queues' shared groups. */
    this.leftQueues = false;
    this.taskTopics = new Map([...plan.queues.keys()].map((q) => [topics.queue(plan.pkg, q, 'tasks'), q]));
    this.announceTopic = topics.announce(plan.pkg);
    /** Jobs admitted and waiting for a handler slot. */
    this.waiting = [];
    /** seq → {controller, task: {id, queue}|null, reply} */
    this.running = new Map();
    this.nextSeq = 0;
    /** Tasks this instance holds (waiting or running), by id. */
    this.held = new Map();
    /** Credit announced to each queue and not yet used, as far as we know. */
    this.outstanding = new Map([...plan.queues.keys()].map((q) => [q, 0]));
    /** What waits for the connection: a clean session would drop what is sent while it is down. */
    this.outbox = [];
    this.outboxCap = 4 * (plan.limits.maxQueue + plan.limits.maxInflight) + 1024;
    this.avgJobMs = null;
    this.refusing = false;
    this.lastProgressCheck = 0;
    /** correlation data → {resolve, reject, timer} of `enqueue` calls */
    this.requests = new Map();
    this.replySubscribed = null;
    /** The broker's lasting refusal behind the connection being closed, if any. */
    this.refusal = null;
    /** Lasting refusals in a row, from whichever node: every node must refuse before the service gives up. */
    this.refusals = 0;
    this.giveUpAfter = Math.max(REFUSALS_BEFORE_GIVING_UP, plan.urls.length);
  }

  async start() {
    // The health port, when there is one, names the instance; else the pid.
    this.slot = this.health ? await serveHealth(this.health, this.vitals, this.limits) : process.pid;
    this.clientId = sanitizeClientId(`axion-svc-${this.service}-${this.host}-${this.slot}`);
    this.replyTopic = topics.reply(this.pkg, this.clientId);
    for (const q of this.queues.keys()) this.taskTopics.set(topics.queueTasksDirected(this.pkg, q, this.clientId), q);
    await this.#startSentinel();
    log.info('service starting', {
      service: this.service,
      package: this.pkg,
      worker: this.clientId,
      broker: this.urls.map((u) => u.display).join(','),
      queues: [...this.queues.keys()],
      events: this.events.map((e) => e.type),
      max_inflight: this.limits.maxInflight,
      max_queue: this.limits.maxQueue,
    });
    this.client = connect(this.urls, this.clientId);
    this.client.on('connect', (connack) => this.#onConnect(connack));
    this.client.on('close', () => this.#onClose());
    this.client.on('error', (err) => {
      // A CONNACK refusal comes as an error carrying its reason code.
      if (LASTING_CONNACK.has(err.code)) this.refusal = `the broker refused the connection: ${err.message}`;
      log.debug('MQTT connection error', { broker: this.client.broker(), error: err.message });
    });
    this.client.on('disconnect', (packet) => {
      if (LASTING_DISCONNECT.has(packet.reasonCode)) {
        const why = packet.properties?.reasonString ? ` (${packet.properties.reasonString})` : '';
        this.refusal = `the broker disconnected this client: reason code 0x${packet.reasonCode.toString(16)}${why}`;
      }
    });
    this.client.on('message', (topic, payload, packet) => this.#onMessage(topic, payload, packet));
    process.on('SIGTERM', () => this.#beginDrain('SIGTERM'));
    process.on('SIGINT', () => this.#beginDrain('SIGINT'));
    this.ticker = setInterval(() => this.#onTick(), TICK_MS);
  }

  /** Starts the heartbeat and watchdog thread and returns once it runs. */
  #startSentinel() {
    this.sentinel = new Worker(new URL('./sentinel.js', import.meta.url), {
      workerData: {
        vitalsBuffer: this.vitals.buffer,
        limits: this.limits,
        heartbeat: {
          urls: this.urls,
          pkg: this.pkg,
          service: this.service,
          host: this.host,
          port: this.slot,
          intervalSecs: this.limits.heartbeatIntervalSecs,
          ghostSecs: this.limits.heartbeatGhostSecs,
          // The queue owner hands this worker's tasks to others when the
          // heartbeat turns offline (QUEUE-CONTRACT "Worker liveness").
          extras: { worker: this.clientId },
        },
      },
    });
    this.sentinel.unref();
    return new Promise((resolve, reject) => {
      this.sentinel.once('message', () => resolve());
      this.sentinel.once('error', reject);
      // Without the sentinel nothing watches this process: fail fast.
      this.sentinel.on('error', (err) => {
        log.error('the heartbeat and watchdog thread failed', { error: err.message });
        process.exit(EXIT_FAILURE);
      });
    });
  }

  get draining() {
    return this.drainDeadline !== null;
  }

  /** Handler slots neither running nor promised to a waiting job. */
  #freeSlots() {
    return Math.max(0, this.limits.maxInflight - this.running.size - this.waiting.length);
  }

  #onConnect(connack) {
    this.connected = true;
    this.vitals.setConnected(true);
    // Absent means available (MQTT 5, 3.2.2.3.13).
    const available = connack?.properties?.sharedSubscriptionAvailable;
    const shared = available !== false && available !== 0;
    const directed = this.forceDirected || !shared;
    log.info('connected to the broker', { broker: this.client.broker(), shared_subscriptions: shared });
    if (directed !== this.directed) {
      log.info('task delivery changes with this node', {
        directed_delivery: directed,
        tasks_on: directed ? "this worker's own topic" : 'the shared subscription',
      });
    }
    this.directed = directed;
    // A clean session: subscriptions first, then fresh credit.
    this.outbox = this.outbox.filter((o) => !o.credit);
    // A draining service joins no queue's shared group (see #leaveQueues).
    const filters = [
      ...(this.draining ? [] : [...this.queues.keys()].map((q) => this.#tasksFilter(q))),
      ...this.events.map((e) => e.filter),
      this.announceTopic,
    ];
    this.replySubscribed = null;
    this.client.subscribe(filters, { qos: 1 }, (err, granted) => {
      const refused = (granted ?? []).filter((g) => g.qos >= 0x80);
      if (refused.some((g) => LASTING_SUBACK.has(g.qos))) {
        // No retry makes the broker allow or support it: a service that
        // cannot take its work must not look alive.
        this.#giveUp(
          `the broker refused a subscription this service needs: ${refused.map((g) => `${g.topic} 0x${g.qos.toString(16)}`).join(', ')}`,
        );
      } else if (err || refused.length > 0) {
        log.error('the broker refused a subscription; this service will not receive that work', {
          error: err?.message,
          refused: refused.map((g) => g.topic),
        });
      } else {
        this.refusals = 0;
        this.vitals.setSubscribed();
      }
    });
    this.#reannounce();
    this.#flush();
  }

  #onClose() {
    this.#countRefusal();
    if (!this.connected) return;
    this.connected = false;
    // Our own DISCONNECT at the end of a clean stop: no loss to report, and
    // the broker rule must not start counting while the final record goes out.
    if (this.stopping) return;
    this.vitals.setConnected(false);
    log.warn('lost the broker; reconnecting', { broker: this.client.broker() });
  }

  /** A closed connection: a lasting refusal counts, anything else starts the count over. */
  #countRefusal() {
    const why = this.refusal;
    this.refusal = null;
    if (why === null || this.stopping) {
      this.refusals = 0;
      return;
    }
    this.refusals += 1;
    log.warn('the broker refused this service', {
      why,
      refusals: this.refusals,
      of: this.giveUpAfter,
    });
    if (this.refusals >= this.giveUpAfter) this.#giveUp(why);
  }

  #giveUp(why) {
    log.error(
      `${why}; giving up (exit 78: restarting will not help until the broker or this service's configuration changes)`,
    );
    process.exit(EXIT_CONFIG);
  }

  #onMessage(topic, payload, packet) {
    if (topic === this.announceTopic) {
      // The queue owner restarted and lost our credit.
      this.#reannounce();
    } else if (topic === this.replyTopic) {
      this.#onReply(payload, packet);
    } else if (this.taskTopics.has(topic)) {
      const queue = this.taskTopics.get(topic);
      let wire;
      try {
        wire = JSON.parse(payload.toString('utf8'));
      } catch (err) {
        log.warn('task record unreadable; ignored (the ack wait brings it back)', { queue, error: err.message });
        return;
      }
      if (typeof wire?.id !== 'string') {
        log.warn('task record without an id; ignored', { queue });
        return;
      }
      this.#onTask(queue, wire);
    } else {
      const ev = this.events.find((e) => topicMatches(topic, e.filter));
      if (ev) this.#onEvent(topic, payload, packet, ev.handler);
    }
    this.#flush();
  }

  #onEvent(topic, payload, packet, handler) {
    const props = packet.properties ?? {};
    const fields = parseEvent(this.pkg, topic, payload, props.responseTopic, props.correlationData);
    const reply = resolveReply(this.pkg, fields.replyTo, fields.correlationId, props.correlationData);
    const full = this.running.size >= this.limits.maxInflight && this.waiting.length >= this.limits.maxQueue;
    if (this.draining || full) {
      if (!this.refusing) {
        this.refusing = true;
        log.warn('refusing requests: at the admission limit', {
          running: this.running.size,
          waiting: this.waiting.length,
          draining: this.draining,
        });
      }
      this.#refuse(reply, fields.type);
      return;
    }
    this.refusing = false;
    const controller = new AbortController();
    this.waiting.push({ event: new Event(fields, this.vitals, controller.signal), controller, handler, reply });
    this.#afterChange();
  }

  /** Answers `overloaded` at once, so the caller retries elsewhere or later instead of hanging. */
  #refuse(reply, eventType) {
    if (!reply) {
      log.debug('event dropped: overloaded and no replyTo to tell', { event_type: eventType });
      return;
    }
    if (this.outbox.length >= this.outboxCap) {
      log.warn('overload reply dropped: the broker is not taking our messages fast enough', { event_type: eventType });
      return;
    }
    this.#reply(reply, { overloaded: true, retry_after_ms: this.#retryAfterMs() });
  }

  /** A guess at when a slot frees: the average job times the rounds of work ahead. */
  #retryAfterMs() {
    const rounds = Math.floor(this.waiting.length / this.limits.maxInflight) + 1;
    const ms = (this.avgJobMs ?? RETRY_AFTER_UNKNOWN_MS) * rounds;
    return Math.floor(Math.min(RETRY_AFTER_MAX_MS, Math.max(RETRY_AFTER_MIN_MS, ms)));
  }

  #onTask(queue, wire) {
    const me = this.clientId;
    const addressedToMe = typeof wire.worker !== 'string' || wire.worker === me;
    if (addressedToMe) this.#useCredit(queue);
    if (this.held.has(wire.id)) {
      // Delivered again (ack wait ran out while it waited here): keep the
      // one copy, and make sure the owner files it under us.
      if (!addressedToMe) this.#claim(queue, wire.id);
      this.#afterChange();
      return;
    }
    const handler = this.queues.get(queue);
    const take = handler !== undefined && !this.draining && (addressedToMe || this.#freeSlots() > 0);
    if (!take) {
      this.#taskMessage(queue, 'release', { id: wire.id, worker: me });
      this.#afterChange();
      return;
    }
    if (!addressedToMe) {
      this.#claim(queue, wire.id);
      this.#useCredit(queue);
    }
    this.held.set(wire.id, { queue, progressSent: Date.now() });
    const controller = new AbortController();
    this.waiting.push({ task: new Task(wire, queue, this.vitals, controller.signal), controller, handler });
    this.#afterChange();
  }

  #useCredit(queue) {
    if (this.outstanding.has(queue)) this.outstanding.set(queue, Math.max(0, this.outstanding.get(queue) - 1));
  }

  #claim(queue, id) {
    this.#taskMessage(queue, 'progress', { id, worker: this.clientId });
  }

  /** Starts waiting jobs into free slots, tops up credit, updates vitals. */
  #afterChange() {
    while (this.running.size < this.limits.maxInflight && this.waiting.length > 0) {
      this.#start(this.waiting.shift());
    }
    this.#topUp();
    this.vitals.setLoad(this.running.size, this.waiting.length);
  }

  #start(job) {
    const seq = this.nextSeq++;
    const { task, event, handler, controller } = job;
    const reply = task
      ? resolveReply(this.pkg, task.replyTo, task.correlationId, undefined)
      : job.reply;
    const run = { controller, task: task ? { id: task.id, queue: task.queue } : null, reply };
    this.running.set(seq, run);
    // Not inline: a handler that never yields must find the vitals saying
    // it runs and the claims and credit already sent.
    setImmediate(() => {
      if (this.running.get(seq) !== run) return;
      const started = performance.now();
      let result;
      try {
        result = Promise.resolve(handler(task ?? event));
      } catch (err) {
        result = Promise.reject(err);
      }
      result.then(
        (value) => this.#onDone(seq, { ok: true, value }, performance.now() - started),
        (err) => this.#onDone(seq, { ok: false, reason: reasonOf(err) }, performance.now() - started),
      );
    });
  }

  #onDone(seq, outcome, tookMs) {
    const run = this.running.get(seq);
    // Gone: handed back by the drain, and its task already released.
    if (!run) return;
    this.running.delete(seq);
    this.avgJobMs = this.avgJobMs === null ? tookMs : this.avgJobMs + AVG_WEIGHT * (tookMs - this.avgJobMs);
    this.vitals.jobDone(this.avgJobMs);
    const value = outcome.value === undefined ? null : outcome.value;
    if (run.task) {
      const { id, queue } = run.task;
      if (this.held.delete(id)) {
        if (outcome.ok) {
          // Named, so the owner counts an ack of a task it handed to
          // another worker (a copy a cluster delivered twice).
          this.#taskMessage(queue, 'ack', { id, worker: this.clientId });
          if (run.reply) this.#reply(run.reply, value);
        } else {
          log.info('task failed; the queue retries it', { queue, id, reason: outcome.reason });
          this.#taskMessage(queue, 'fail', { id, reason: outcome.reason });
        }
      }
    } else if (run.reply) {
      this.#reply(run.reply, outcome.ok ? value : { error: outcome.reason });
    }
    this.#afterChange();
    this.#checkDrain();
    this.#flush();
  }

  #onTick() {
    if (this.draining) {
      this.#checkDrain();
      return;
    }
    const every = this.limits.ackWaitMs / 3;
    const now = Date.now();
    if (now - this.lastProgressCheck < Math.min(every, 250)) return;
    this.lastProgressCheck = now;
    // Long tasks keep their ack wait alive, whether running or waiting.
    for (const [id, h] of this.held) {
      if (now - h.progressSent >= every) {
        h.progressSent = now;
        this.#taskMessage(h.queue, 'progress', { id });
      }
    }
    this.#flush();
  }

  /** Gives each queue credit up to the free slots (additive `ready`). */
  #topUp() {
    if (!this.connected || this.draining) return;
    const free = this.#freeSlots();
    for (const q of this.queues.keys()) {
      const have = this.outstanding.get(q) ?? 0;
      if (have < free) {
        this.#credit(q, { worker: this.clientId, credits: free - have });
        this.outstanding.set(q, free);
      }
    }
  }

  /** Sets each queue's credit to the free slots (`reset`): on connect and when the owner asks after its restart. */
  #reannounce() {
    const free = this.draining ? 0 : this.#freeSlots();
    for (const q of this.queues.keys()) {
      this.#credit(q, { worker: this.clientId, credits: free, reset: true });
      this.outstanding.set(q, free);
    }
  }

  #credit(queue, body) {
    if (this.directed) body.directed = true;
    this.outbox.push({ topic: topics.queue(this.pkg, queue, 'ready'), body: JSON.stringify(body), credit: true });
  }

  #taskMessage(queue, leaf, body) {
    this.outbox.push({ topic: topics.queue(this.pkg, queue, leaf), body: JSON.stringify(body) });
  }

  #reply(target, payload) {
    const properties = target.correlationData
      ? { correlationData: target.correlationData, payloadFormatIndicator: true, contentType: 'application/json' }
      : undefined;
    this.outbox.push({
      topic: target.topic,
      body: envelope(target.type, this.service, payload, target.correlationId),
      properties,
    });
  }

  /**
   * Hands everything to MQTT.js while connected; nothing goes while
   * disconnected. The socket is corked meanwhile, so an ack, a reply and a
   * credit leave in one write instead of one each.
   */
  #flush() {
    if (!this.connected || this.outbox.length === 0) return;
    const stream = this.client.stream;
    stream.cork();
    process.nextTick(() => stream.uncork());
    for (const out of this.outbox) {
      this.client.publish(out.topic, out.body, { qos: 1, properties: out.properties }, (err) => {
        if (err) log.debug('publish not acknowledged', { topic: out.topic, error: err.message });
      });
    }
    this.outbox = [];
  }

  /** Publishes an MQTT 5 request with a Response Topic and waits for the reply carrying its correlation data. */
  async request(topic, body, timeoutMs) {
    if (!this.replySubscribed) {
      this.replySubscribed = this.client.subscribeAsync(this.replyTopic, { qos: 1 });
    }
    await this.replySubscribed;
    const correlation = randomUUID();
    const answer = new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.requests.delete(correlation);
        reject(new Error(`no confirmation from the queue owner within ${timeoutMs} ms`));
      }, timeoutMs);
      this.requests.set(correlation, { resolve, reject, timer });
    });
    try {
      await this.client.publishAsync(topic, JSON.stringify(body), {
        qos: 1,
        properties: { responseTopic: this.replyTopic, correlationData: Buffer.from(correlation) },
      });
    } catch (err) {
      // A full queue answers twice: PUBACK 0x97 (Quota exceeded) and the
      // owner's reply, which says why; the reply settles the request.
      if (err?.code !== 0x97) {
        const pending = this.requests.get(correlation);
        if (pending) {
          this.requests.delete(correlation);
          clearTimeout(pending.timer);
        }
        throw err;
      }
    }
    return answer;
  }

  #onReply(payload, packet) {
    const correlation = packet.properties?.correlationData?.toString();
    const pending = correlation && this.requests.get(correlation);
    if (!pending) return;
    this.requests.delete(correlation);
    clearTimeout(pending.timer);
    let reply;
    try {
      reply = JSON.parse(payload.toString('utf8'));
    } catch {
      pending.reject(new Error('the queue owner sent an unreadable reply'));
      return;
    }
    if (typeof reply?.error === 'string') pending.reject(new Error(reply.error));
    else pending.resolve(reply);
  }

  /**
   * SIGTERM/SIGINT: no more credit, `draining` heartbeat, waiting work
   * handed back or refused, running handlers get `DRAIN_MS`.
   */
  #beginDrain(why) {
    if (this.draining) {
      // A second signal is an operator who does not want to wait.
      log.warn('second signal: handing running tasks back now', { signal: why });
      this.drainDeadline = 0;
      this.#checkDrain();
      return;
    }
    log.info('draining', {
      signal: why,
      running: this.running.size,
      waiting: this.waiting.length,
      drain_ms: this.limits.drainMs,
    });
    this.drainDeadline = Date.now() + this.limits.drainMs;
    this.vitals.setDraining();
    this.sentinel.postMessage({ cmd: 'draining' });
    this.#reannounce();
    this.#leaveQueues();
    for (const job of this.waiting.splice(0)) {
      if (job.task) {
        this.held.delete(job.task.id);
        this.#taskMessage(job.task.queue, 'release', { id: job.task.id, worker: this.clientId });
      } else {
        this.#refuse(job.reply, job.event.type);
      }
    }
    this.vitals.setLoad(this.running.size, 0);
    this.#flush();
    this.#checkDrain();
  }

  /** Where this worker takes the tasks of `queue`. */
  #tasksFilter(queue) {
    return this.directed
      ? topics.queueTasksDirected(this.pkg, queue, this.clientId)
      : topics.queueTasksShared(this.pkg, queue);
  }

  /**
   * Leaves the queues' shared groups (or own topics). The owner delivers what others hand
   * back (this service's releases too) through the group, to any member: a
   * member no longer reading would take a task meant for another worker and
   * drop it, and the task would wait out the ack wait. What arrives before
   * the UNSUBACK is released as usual.
   */
  #leaveQueues() {
    if (this.queues.size === 0 || !this.connected) return;
    const filters = [...this.queues.keys()].map((q) => this.#tasksFilter(q));
    this.client.unsubscribe(filters, (err) => {
      if (err) return;
      this.leftQueues = true;
      this.#checkDrain();
    });
  }

  /**
   * Whether no more task can reach this service: its UNSUBACK came, it
   * serves no queue, or the connection is down (and a reconnect while
   * draining subscribes no queue).
   */
  #outOfGroups() {
    return this.leftQueues || this.queues.size === 0 || !this.connected;
  }

  #checkDrain() {
    if (!this.draining || this.stopping) return;
    if (this.running.size === 0 && this.#outOfGroups()) {
      log.info('drain complete: every running handler finished');
    } else if (Date.now() >= this.drainDeadline) {
      this.#abandonRunning();
    } else {
      return;
    }
    this.stopping = true;
    this.#stop();
  }

  /** `DRAIN_MS` is up: abort the handlers still running and hand their tasks back (not counted as an attempt). */
  #abandonRunning() {
    log.warn('drain time is up; handing unfinished tasks back', { running: this.running.size });
    for (const run of this.running.values()) {
      run.controller.abort(new Error('the service is stopping'));
      if (run.task) {
        this.held.delete(run.task.id);
        this.#taskMessage(run.task.queue, 'release', { id: run.task.id, worker: this.clientId });
      } else if (run.reply) {
        this.#refuse(run.reply, run.reply.type);
      }
    }
    this.running.clear();
    this.vitals.setLoad(0, 0);
  }

  /** Lets the acks, results and releases leave, disconnects, publishes `offline`/`stopped`, exits 0. */
  async #stop() {
    clearInterval(this.ticker);
    this.#flush();
    if (this.outbox.length > 0) {
      log.warn('stopping with messages not sent; held tasks come back through the heartbeat or the ack wait', {
        left: this.outbox.length,
      });
    }
    await new Promise((resolve) => {
      const timer = setTimeout(() => {
        log.warn('MQTT connection did not close in time');
        this.client.end(true, resolve);
      }, FINAL_FLUSH_MS);
      this.client.end(false, () => {
        clearTimeout(timer);
        resolve();
      });
    });
    const stopped = await new Promise((resolve) => {
      this.sentinel.once('message', (msg) => resolve(msg.stopped));
      this.sentinel.postMessage({ cmd: 'stop', reason: 'stopped', waitMs: FINAL_HEARTBEAT_WAIT_MS });
    });
    log.info('service stopped', { final_heartbeat: stopped });
    process.exit(EXIT_OK);
  }
}
