/**
 * The few numbers that say whether a service is healthy, in a
 * SharedArrayBuffer.
 *
 * The main thread (connection, dispatcher, handlers) writes them; the
 * sentinel thread (heartbeat and watchdog) reads them. Shared memory and
 * Atomics, not messages, because the reader must see the truth when the
 * main thread's event loop is the very thing that is stuck: a handler in a
 * busy loop never lets a message out. Times are monotonic milliseconds from
 * `process.hrtime`, which is one clock for every thread of the process.
 *
 * @module
 */

const CONNECTED = 0;
/** When the broker connection was lost (or the start, before the first CONNACK). */
const DISCONNECTED_AT = 1;
const SUBSCRIBED = 2;
const RUNNING = 3;
const WAITING = 4;
/** Last forward progress, or work arriving at an idle service (idle is not stalled). */
const PROGRESS_AT = 5;
/** Wall-clock milliseconds of the last job end or progress report (`last_progress_ts`). */
const PROGRESS_UNIX_MS = 6;
/** Bumped on every job end and progress report. */
const PROGRESS_SEQ = 7;
const DRAINING = 8;
/** `avg_job_ms` in microseconds; -1 before the first job. */
const AVG_JOB_US = 9;
const SLOTS = 10;

/** Monotonic milliseconds, comparable across the threads of this process. */
export function monotonicMs() {
  return process.hrtime.bigint() / 1_000_000n;
}

export class Vitals {
  /**
   * @param {SharedArrayBuffer} [buffer] the main thread's buffer, when
   *   opened from the sentinel thread; a new one otherwise.
   */
  constructor(buffer) {
    const fresh = buffer === undefined;
    this.buffer = buffer ?? new SharedArrayBuffer(SLOTS * 8);
    this.slots = new BigInt64Array(this.buffer);
    if (fresh) {
      const now = monotonicMs();
      this.#set(DISCONNECTED_AT, now);
      this.#set(PROGRESS_AT, now);
      this.#set(AVG_JOB_US, -1n);
    }
  }

  #get(slot) {
    return Atomics.load(this.slots, slot);
  }

  #set(slot, value) {
    Atomics.store(this.slots, slot, value);
  }

  setConnected(connected) {
    const was = Atomics.exchange(this.slots, CONNECTED, connected ? 1n : 0n) === 1n;
    if (was && !connected) {
      this.#set(DISCONNECTED_AT, monotonicMs());
      this.#set(SUBSCRIBED, 0n);
    }
  }

  get connected() {
    return this.#get(CONNECTED) === 1n;
  }

  /** How long the broker has been unreachable; `null` while connected. */
  disconnectedForMs() {
    if (this.connected) return null;
    return Number(monotonicMs() - this.#get(DISCONNECTED_AT));
  }

  setSubscribed() {
    this.#set(SUBSCRIBED, 1n);
  }

  get subscribed() {
    return this.#get(SUBSCRIBED) === 1n;
  }

  /**
   * Publishes the dispatcher's counts. Work arriving at an idle service
   * starts the stall clock now, not at the last job of long ago.
   */
  setLoad(running, waiting) {
    if (this.running + this.waiting === 0 && running + waiting > 0) {
      this.#set(PROGRESS_AT, monotonicMs());
    }
    this.#set(RUNNING, BigInt(running));
    this.#set(WAITING, BigInt(waiting));
  }

  get running() {
    return Number(this.#get(RUNNING));
  }

  get waiting() {
    return Number(this.#get(WAITING));
  }

  /** Forward progress: a job ended, or a handler said it is still going. */
  progress() {
    this.#set(PROGRESS_AT, monotonicMs());
    this.#set(PROGRESS_UNIX_MS, BigInt(Date.now()));
    Atomics.add(this.slots, PROGRESS_SEQ, 1n);
  }

  /** A job ended: progress, and the new average duration. */
  jobDone(avgMs) {
    this.#set(AVG_JOB_US, BigInt(Math.round(avgMs * 1000)));
    this.progress();
  }

  get progressSeq() {
    return this.#get(PROGRESS_SEQ);
  }

  /** Unix seconds of the last progress, or `null` before any. */
  get lastProgressTs() {
    const ms = this.#get(PROGRESS_UNIX_MS);
    return ms === 0n ? null : Number(ms) / 1000;
  }

  /** Average job duration in milliseconds, or `null` before the first job. */
  get avgJobMs() {
    const us = this.#get(AVG_JOB_US);
    return us < 0n ? null : Number(us) / 1000;
  }

  /** How long work has been pending without progress; `null` when idle. */
  stalledForMs() {
    if (this.running + this.waiting === 0) return null;
    return Number(monotonicMs() - this.#get(PROGRESS_AT));
  }

  setDraining() {
    this.#set(DRAINING, 1n);
  }

  get draining() {
    return this.#get(DRAINING) === 1n;
  }
}
