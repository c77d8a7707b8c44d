// Types of axion-client: Axion's service runtime for Node services, over MQTT.

/** Any JSON value: what payloads and results are on the wire. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** A task as the queue owner delivered it (docs/DESIGN.md "Task record"). */
export declare class Task<P = Json> {
  readonly id: string;
  readonly queue: string;
  readonly payload: P;
  /** Unix milliseconds. */
  readonly createdAt: number;
  /** Deliveries including this one. */
  readonly attempts: number;
  readonly replyTo?: string;
  readonly correlationId?: string;
  /** Aborted when the service stops waiting for this task (`DRAIN_MS` after SIGTERM); the task is handed back. */
  readonly signal: AbortSignal;
  /**
   * Tells the watchdog that this long task is still moving, so a job longer
   * than `LIVENESS_MAX_STALL_MS` is not mistaken for a hang. (The queue
   * owner's ack wait is extended automatically.)
   */
  progress(): void;
}

/** An event as received (docs/DESIGN.md "Event envelope"). */
export declare class Event<P = Json> {
  /** `t1.t2.…`, from the envelope or, for a bare MQTT payload, the topic. */
  readonly type: string;
  readonly source?: string;
  readonly payload: P;
  readonly timestamp?: string;
  readonly correlationId?: string;
  /** Where the answer goes: an event type or a whole topic. */
  readonly replyTo?: string;
  /** The MQTT topic it arrived on. */
  readonly topic: string;
  /** Aborted when the service stops waiting for this request (`DRAIN_MS` after SIGTERM). */
  readonly signal: AbortSignal;
  /** See {@link Task.progress}. */
  progress(): void;
}

/**
 * What a handler returns, or resolves to: the result, acked and published
 * to `replyTo`. A throw or a rejection fails the attempt; the reason is
 * the error's message.
 */
export type HandlerResult = Json | undefined | void;
export type TaskHandler<P = any> = (task: Task<P>) => HandlerResult | Promise<HandlerResult>;
export type EventHandler<P = any> = (event: Event<P>) => HandlerResult | Promise<HandlerResult>;

export interface ServiceOptions {
  /** Topic level under `axion/`; default `AXION_PACKAGE`, else `default`. */
  package?: string;
  /**
   * `mqtt://[user[:password]@]host[:port]` or `unix://[user[:password]@]/path`;
   * default `AXION_MQTT_URL`, else `mqtt://127.0.0.1:1883`.
   */
  mqtt?: string;
  /**
   * Serve `/health/live` and `/health/ready` on this address
   * (`127.0.0.1:9400`); its port then names the instance in the heartbeat
   * topic instead of the pid. Default `HEALTH_LISTEN`, else none.
   */
  healthListen?: string;
  /**
   * Take tasks on this worker's own topic (`…/tasks/<worker>`) instead of
   * the queue's shared subscription, for brokers whose shared
   * subscriptions do not span the cluster. Default
   * `AXION_DIRECTED_DELIVERY`; a node whose CONNACK says it has no shared
   * subscriptions switches on its own.
   */
  directedDelivery?: boolean;
}

export interface EnqueueOptions {
  /** Task id: enqueueing an id that is still queued or in flight does nothing. */
  id?: string;
  /** Where the worker publishes its result: an event type or a topic. */
  replyTo?: string;
  correlationId?: string;
  /** Deliveries before the task is dead-lettered (the owner's default: 5). */
  maxAttempts?: number;
  /** Deliver no sooner than this many ms from now. */
  delayMs?: number;
  /** How long to wait for the owner's confirmation; default 10 000. */
  timeoutMs?: number;
}

/** The queue owner's confirmation: the task is on disk. */
export interface Enqueued {
  id: string;
  queue: string;
  /** The id was already queued or in flight: nothing new was enqueued. */
  duplicate?: boolean;
}

export interface PublishOptions {
  replyTo?: string;
  correlationId?: string;
}

/**
 * A service: queues and event handlers, run with the runtime's
 * guarantees. Limits come from `MAX_INFLIGHT` (8), `MAX_QUEUE` (256),
 * `DISCONNECT_KILL_MS` (10 000), `LIVENESS_MAX_STALL_MS` (30 000),
 * `DRAIN_MS` (5 000), `HEARTBEAT_INTERVAL_SECS` (15).
 */
export declare class Service {
  constructor(name: string, options?: ServiceOptions);
  /** Serves queue `name`: each task goes to `handler`. */
  queue<P = any>(name: string, handler: TaskHandler<P>): this;
  /** Handles events of `type` (`fs.change`, or with `+`/`#` segments); a result goes to the event's `replyTo`. */
  event<P = any>(type: string, handler: EventHandler<P>): this;
  /** Publishes an event envelope of `type`; resolves once the broker has it. */
  publish(type: string, payload: Json, options?: PublishOptions): Promise<void>;
  /** Enqueues a task; resolves once the queue owner confirms it is on disk, rejects with its refusal. */
  enqueue(queue: string, payload: Json, options?: EnqueueOptions): Promise<Enqueued>;
  /**
   * Runs until SIGTERM/SIGINT, drains, and exits the process with 0; exits
   * with 70 when the broker is lost, 71 when work stalls, 78 on a
   * configuration error. Never resolves.
   */
  run(): Promise<never>;
}

/** A configuration the service cannot run with (it exits with 78). */
export declare class ConfigError extends Error {}

export declare const EXIT_OK: 0;
export declare const EXIT_FAILURE: 1;
export declare const EXIT_BROKER_LOST: 70;
export declare const EXIT_STALLED: 71;
export declare const EXIT_CONFIG: 78;
