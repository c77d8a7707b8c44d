/**
 * What handlers receive (a task record, an event envelope) and where their
 * answers go.
 *
 * `replyTo` is an event type in the legacy protocol (`embedding.result` →
 * `axion/<pkg>/event/embedding/result`) and a whole topic when it comes as
 * an MQTT 5 Response Topic; both are resolved here, once, so tasks, events
 * and overload refusals reply the same way. Replies are event envelopes
 * (docs/DESIGN.md "Bodies"), so WebSocket clients of the bridge receive
 * them like any other event.
 *
 * @module
 */

import { topics } from './config.js';
import { log } from './log.js';

const text = (v) => (typeof v === 'string' && v !== '' ? v : undefined);

/**
 * A task as the queue owner delivered it (docs/DESIGN.md "Task record").
 * `progress()` tells the watchdog that a long task is still moving, so a
 * job longer than `LIVENESS_MAX_STALL_MS` is not mistaken for a hang (the
 * queue owner's ack wait is extended automatically); `signal` aborts when
 * the service stops waiting for it (`DRAIN_MS` after SIGTERM).
 */
export class Task {
  constructor(wire, queue, vitals, signal) {
    this.id = wire.id;
    this.queue = text(wire.queue) ?? queue;
    this.payload = wire.payload ?? null;
    /** Unix milliseconds. */
    this.createdAt = typeof wire.createdAt === 'number' ? wire.createdAt : 0;
    /** Deliveries including this one. */
    this.attempts = typeof wire.attempts === 'number' ? wire.attempts : 0;
    this.replyTo = text(wire.replyTo);
    this.correlationId = text(wire.correlationId);
    this.signal = signal;
    Object.defineProperty(this, 'vitals', { value: vitals });
  }

  progress() {
    this.vitals.progress();
  }
}

/** An event as received (docs/DESIGN.md "Event envelope"). */
export class Event {
  constructor(fields, vitals, signal) {
    /** `t1.t2.…`, from the envelope or, for a bare MQTT payload, the topic. */
    this.type = fields.type;
    this.source = fields.source;
    this.payload = fields.payload;
    this.timestamp = fields.timestamp;
    this.correlationId = fields.correlationId;
    /** Where the answer goes: an event type or a whole topic. */
    this.replyTo = fields.replyTo;
    /** The MQTT topic it arrived on. */
    this.topic = fields.topic;
    this.signal = signal;
    Object.defineProperty(this, 'vitals', { value: vitals });
  }

  /** See {@link Task#progress}. */
  progress() {
    this.vitals.progress();
  }
}

/**
 * Parses what arrived on an event topic: an envelope, or a bare MQTT
 * payload that gets its type from the topic (as the bridge does).
 */
export function parseEvent(pkg, topic, body, responseTopic, correlationData) {
  const prefix = `axion/${pkg}/event/`;
  const topicType = (topic.startsWith(prefix) ? topic.slice(prefix.length) : topic).replaceAll('/', '.');
  let value;
  try {
    value = JSON.parse(body.toString('utf8'));
  } catch {
    value = body.toString('utf8');
  }
  const dataCorr = correlationData ? Buffer.from(correlationData).toString('utf8') : undefined;
  if (value && typeof value === 'object' && !Array.isArray(value) && typeof value.type === 'string') {
    return {
      type: text(value.type) ?? topicType,
      source: text(value.source),
      timestamp: text(value.timestamp),
      correlationId: text(value.correlationId) ?? dataCorr,
      replyTo: text(responseTopic) ?? text(value.replyTo),
      payload: value.payload ?? null,
      topic,
    };
  }
  return {
    type: topicType,
    correlationId: dataCorr,
    replyTo: text(responseTopic),
    payload: value,
    topic,
  };
}

/**
 * Where and how to answer one request: `replyTo` resolved to a topic (an
 * event type, or a topic when it has a `/`). `null` when there is none or
 * it cannot be a publish topic.
 */
export function resolveReply(pkg, replyTo, correlationId, correlationData) {
  if (!text(replyTo)) return null;
  let topic;
  let type;
  if (replyTo.includes('/')) {
    const prefix = `axion/${pkg}/event/`;
    topic = replyTo;
    type = replyTo.startsWith(prefix) ? replyTo.slice(prefix.length).replaceAll('/', '.') : replyTo;
  } else {
    topic = topics.event(pkg, replyTo);
    type = replyTo;
  }
  if (/[+#\0]/.test(topic) || topic.startsWith('$')) {
    log.warn('reply target is not a publish topic; no reply sent', { reply_to: replyTo });
    return null;
  }
  return { topic, type, correlationId, correlationData };
}

/** The event envelope around `payload`. */
export function envelope(type, source, payload, correlationId, replyTo) {
  const env = { type, source, payload: payload === undefined ? null : payload, timestamp: new Date().toISOString() };
  if (correlationId !== undefined) env.correlationId = correlationId;
  if (replyTo !== undefined) env.replyTo = replyTo;
  return JSON.stringify(env);
}
