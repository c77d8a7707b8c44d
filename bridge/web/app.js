// The fleet view: connects to this server's MQTT over WebSocket (/mqtt),
// takes every retained heartbeat record and queue stats message, and
// redraws the tables as they change, as `axion monitor` does.
'use strict';

const STALE_AFTER_INTERVALS = 3;
const instances = new Map(); // topic -> record
const queues = new Map(); // topic -> stats
const $ = (id) => document.getElementById(id);

function age(seconds) {
  if (seconds < 0 || !Number.isFinite(seconds)) return '–';
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${Math.round(seconds / 3600)} h`;
}

// What an operator should read off a record: offline (and why), stale
// (no beat for three intervals), or what it says of itself.
function stateOf(r, now) {
  if (r.status === 'offline') return ['offline', r.reason ? `offline (${r.reason})` : 'offline'];
  const interval = r.interval_secs || 15;
  if (now - r.timestamp > STALE_AFTER_INTERVALS * interval) return ['stale', 'stale'];
  return [r.status || 'online', r.status || 'online'];
}

function alarmOf(r, now) {
  if (r.connected === false) return 'lost the broker';
  if (r.inflight > 0 && r.last_progress_ts && now - r.last_progress_ts > 60) return 'no progress';
  return '';
}

function cell(text, cls) {
  const td = document.createElement('td');
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function draw() {
  const now = Date.now() / 1000;
  const rows = [...instances.entries()].sort(([a], [b]) => a.localeCompare(b));
  const body = $('instances');
  body.replaceChildren();
  let online = 0;
  for (const [topic, r] of rows) {
    const [cls, label] = stateOf(r, now);
    if (cls === 'online') online += 1;
    const alarm = alarmOf(r, now);
    const tr = document.createElement('tr');
    tr.dataset.topic = topic;
    tr.dataset.state = cls;
    tr.dataset.ts = r.timestamp;
    if (alarm || cls === 'offline' || cls === 'stale') tr.className = 'alarm';
    tr.append(
      cell(r.package || topic.split('/')[1]), cell(r.service), cell(r.instance_id),
      cell(label, cls), cell(age(now - r.timestamp)), cell(r.connected === false ? 'no' : 'yes'),
      cell(r.queue_depth ?? 0), cell(r.inflight ?? 0),
      cell(r.last_progress_ts ? `${age(now - r.last_progress_ts)} ago` : '–'),
      cell(r.avg_job_ms != null ? `${r.avg_job_ms.toFixed(1)} ms` : '–'),
      cell(r.cpu_percent != null ? `${r.cpu_percent.toFixed(0)} %` : '–'),
      cell(r.memory_bytes != null ? `${(r.memory_bytes / 1048576).toFixed(0)} MiB` : '–'),
      cell(alarm, alarm ? 'offline' : ''),
    );
    body.append(tr);
  }
  $('counts').textContent = `(${online} online of ${rows.length})`;
  const qbody = $('queues');
  qbody.replaceChildren();
  for (const [topic, q] of [...queues.entries()].sort(([a], [b]) => a.localeCompare(b))) {
    const tr = document.createElement('tr');
    tr.dataset.queue = q.queue;
    tr.append(
      cell(topic.split('/')[1]), cell(q.queue), cell(q.depth), cell(q.inflight), cell(q.dead, q.dead > 0 ? 'offline' : ''),
      cell((q.enqueue_rate ?? 0).toFixed(1)), cell((q.ack_rate ?? 0).toFixed(1)), cell(q.workers ?? 0),
      cell(q.oldest_age_ms ? age(q.oldest_age_ms / 1000) : '–'),
    );
    qbody.append(tr);
  }
}

let client;

function connect(username, password) {
  if (client) client.end(true);
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const options = {
    protocolVersion: 5,
    clean: true,
    reconnectPeriod: 2000,
    clientId: `axion-web-${Math.random().toString(16).slice(2, 12)}`,
  };
  if (username) options.username = username;
  if (password) options.password = password;
  client = mqtt.connect(`${scheme}://${location.host}/mqtt`, options);
  client.on('connect', () => {
    $('status').textContent = `connected to ${location.host}`;
    $('login').style.display = 'none';
    client.subscribe(['axion/+/heartbeat/+/+', 'axion/+/queue/+/stats'], { qos: 0 });
  });
  client.on('close', () => { $('status').textContent = 'disconnected; reconnecting…'; });
  client.on('error', (err) => {
    // A refused login does not get better by retrying: ask for one.
    if (err && (err.code === 135 || err.code === 134 || err.code === 4 || err.code === 5)) {
      client.end(true);
      $('login-why').textContent = `The broker refused the login (${err.message}).`;
      $('login').style.display = 'block';
      $('status').textContent = 'login needed';
    }
  });
  client.on('message', (topic, payload) => {
    const map = topic.includes('/heartbeat/') ? instances : queues;
    if (payload.length === 0) {
      map.delete(topic);
    } else {
      try { map.set(topic, JSON.parse(payload.toString())); } catch { return; }
    }
    draw();
  });
}

$('login').addEventListener('submit', (e) => {
  e.preventDefault();
  const form = new FormData(e.target);
  connect(form.get('username'), form.get('password'));
});

if (typeof mqtt === 'undefined') {
  $('status').textContent = 'This axion was built without MQTT.js (run scripts/setup.sh, then rebuild): the page cannot connect.';
} else {
  connect();
  // Ages and staleness move even when nothing arrives.
  setInterval(draw, 1000);
}
