// Stand-in for the legacy queue manager module, whose code the legacy broker
// does not include (it only calls it). It follows the in-memory "v0" the
// legacy design planned ("Unified Broker + Task Queue System"):
// `queues` maps a queue name to its waiting tasks, `workers` maps it to the
// sockets that said `ready`, and a task record is
// `{ id, queue, payload, status, assignedTo, attempts, createdAt }`,
// delivered as `{ task }` (what the legacy clients read). Nothing is on disk:
// it is the "before" of the queue benchmark, not a reference for semantics.
import { randomUUID } from "crypto";

const queues = new Map(); // queueName -> task[] (waiting)
const workers = new Map(); // queueName -> [{ ws, clientId }] (one per ready)
const inFlight = new Map(); // taskId -> task

function dispatch(queue) {
  const waiting = queues.get(queue);
  const ready = workers.get(queue);
  while (waiting && waiting.length && ready && ready.length) {
    const { ws, clientId } = ready.shift();
    if (ws.readyState !== 1) continue;
    const task = waiting.shift();
    task.status = "in-progress";
    task.assignedTo = clientId;
    task.attempts += 1;
    inFlight.set(task.id, task);
    ws.send(JSON.stringify({ task }));
  }
}

export const queueManager = {
  enqueue(queue, payload) {
    const task = {
      id: randomUUID(),
      queue,
      payload,
      status: "queued",
      assignedTo: null,
      attempts: 0,
      createdAt: new Date().toISOString(),
    };
    if (!queues.has(queue)) queues.set(queue, []);
    queues.get(queue).push(task);
    dispatch(queue);
    return task.id;
  },

  ready(ws, clientId, queue) {
    if (!workers.has(queue)) workers.set(queue, []);
    workers.get(queue).push({ ws, clientId });
    dispatch(queue);
  },

  acknowledge(clientId, taskId) {
    const task = inFlight.get(taskId);
    if (task && task.assignedTo === clientId) {
      task.status = "done";
      inFlight.delete(taskId);
    }
  },

  heartbeat() {},

  // A worker that goes away gives its tasks back to the front of their queues.
  unregisterWorker(clientId) {
    for (const [queue, ready] of workers) {
      workers.set(queue, ready.filter((w) => w.clientId !== clientId));
    }
    for (const [taskId, task] of inFlight) {
      if (task.assignedTo !== clientId) continue;
      inFlight.delete(taskId);
      task.status = "queued";
      task.assignedTo = null;
      queues.get(task.queue).unshift(task);
      dispatch(task.queue);
    }
  },
};
