/**
 * The sentinel thread: the heartbeat and the fail-fast watchdog, on a
 * `worker_threads` Worker of their own.
 *
 * A legacy service lost its broker and hung while looking alive. A handler
 * that spins (`while (true) {}`) freezes the main thread's event loop, and
 * with it every timer, socket and signal handler there, so neither rule
 * below could fire from it. This thread has its own event loop; it reads
 * the shared {@link Vitals} on a short interval and ends the process with a
 * distinct code when either rule fires, so the supervisor (PM2) restarts
 * it: 70 when the broker has been unreachable longer than
 * `DISCONNECT_KILL_MS`, 71 when work is pending and nothing progressed for
 * `LIVENESS_MAX_STALL_MS`.
 *
 * Ending the process from a worker takes care: `process.exit` in a worker
 * ends only the worker, and a signal cannot carry an exit code. So the
 * sentinel asks the main thread itself to exit, through the in-process
 * inspector: a `Runtime.evaluate` of `process.reallyExit(code)` sent over
 * `inspector.Session#connectToMainThread` is run by V8 as an interrupt, on
 * the main thread, even in the middle of a busy loop or while it waits on a
 * promise that never settles. The supervisor then sees exit code 70 or 71.
 * Should that ever not land (Node built without the inspector), SIGKILL
 * still ends the process, so it is restarted either way.
 *
 * @module
 */

import { parentPort, workerData } from 'node:worker_threads';
import { Vitals } from './vitals.js';
import { Heartbeat } from './heartbeat.js';
import { log } from './log.js';
import { EXIT_BROKER_LOST, EXIT_STALLED } from './config.js';

/** How long the final `offline` record may take: the exit must land within threshold + 1 s. */
const FINAL_HEARTBEAT_WAIT_MS = 600;
/** How long the main thread has to act on the exit request before SIGKILL. */
const EXIT_GRACE_MS = 2_000;

const { vitalsBuffer, limits, heartbeat: hbConfig } = workerData;
const vitals = new Vitals(vitalsBuffer);
const heartbeat = new Heartbeat({ ...hbConfig, vitals });
let dying = false;

const watchdog = setInterval(() => {
  const lost = vitals.disconnectedForMs();
  if (lost !== null && lost > limits.disconnectKillMs) {
    log.error('broker unreachable for too long; exiting so the supervisor restarts this service', {
      disconnected_ms: lost,
      limit_ms: limits.disconnectKillMs,
      reason: 'broker-lost',
      code: EXIT_BROKER_LOST,
    });
    die('broker-lost', EXIT_BROKER_LOST);
    return;
  }
  const stalled = vitals.stalledForMs();
  if (stalled !== null && stalled > limits.livenessMaxStallMs) {
    log.error('work pending with no progress; exiting so the supervisor restarts this service', {
      stalled_ms: stalled,
      limit_ms: limits.livenessMaxStallMs,
      running: vitals.running,
      waiting: vitals.waiting,
      reason: 'stalled',
      code: EXIT_STALLED,
    });
    die('stalled', EXIT_STALLED);
  }
}, limits.watchdogIntervalMs);

/**
 * Publishes the reason where the heartbeat connection still works (with
 * the broker gone the record cannot land; its will says `lost`), then ends
 * the process without running anything of the stuck main thread's.
 */
async function die(reason, code) {
  if (dying) return;
  dying = true;
  clearInterval(watchdog);
  let published = false;
  if (heartbeat.publishing) {
    published = await Promise.race([
      heartbeat.stop(reason, FINAL_HEARTBEAT_WAIT_MS),
      new Promise((resolve) => setTimeout(resolve, FINAL_HEARTBEAT_WAIT_MS, false)),
    ]);
  }
  log.error('exiting', { reason, code, final_heartbeat: published, topic: heartbeat.topic });
  await exitProcess(code);
}

async function exitProcess(code) {
  setTimeout(() => process.kill(process.pid, 'SIGKILL'), EXIT_GRACE_MS).unref();
  try {
    const { Session } = await import('node:inspector');
    const session = new Session();
    session.connectToMainThread();
    session.post('Runtime.evaluate', { expression: `process.reallyExit(${code})` });
  } catch (err) {
    log.error('cannot reach the main thread to exit; killing the process', { error: err.message });
    process.kill(process.pid, 'SIGKILL');
  }
}

parentPort.on('message', async (msg) => {
  switch (msg.cmd) {
    case 'draining':
      heartbeat.draining();
      break;
    case 'stop': {
      clearInterval(watchdog);
      const acked = await heartbeat.stop(msg.reason, msg.waitMs);
      parentPort.postMessage({ stopped: acked });
      break;
    }
    default:
      log.warn('sentinel: unknown command', { cmd: msg.cmd });
  }
});

parentPort.postMessage({ started: true });
