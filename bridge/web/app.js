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

// MQTT 5 CONNACK codes after which retrying the same login cannot help:
// bad user name or password, not authorized, banned (too many failures
// from this address), and their 3.1.1 forms.
const LOGIN_REFUSED = new Set([134, 135, 138, 4, 5]);

function connect(username, password) {
  if (client) client.end(true);
  // A new login may see less than the last one did: show only what it reads.
  instances.clear();
  queues.clear();
  draw();
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const options = {
    protocolVersion: 5,
    clean: true,
    reconnectPeriod: 2000,
    // Empty: the broker assigns an id. One the page made up could fall
    // under the prefix reserved to Axion's own components (refused with
    // auth on) or take over another client's session.
    clientId: '',
  };
  if (username) options.username = username;
  if (password) options.password = password;
  const c = mqtt.connect(`${scheme}://${location.host}/mqtt`, options);
  client = c;
  // Events of a client this page has since replaced say nothing about now.
  const current = () => c === client;
  let refused = false;
  c.on('connect', () => {
    if (!current()) return;
    $('status').textContent = `connected to ${location.host}`;
    $('login').style.display = 'none';
    const filters = ['axion/+/heartbeat/+/+', 'axion/+/queue/+/stats'];
    c.subscribe(filters, { qos: 0 }, (err, _subs, suback) => {
      // With auth on, the ACL decides what this login may read; an empty
      // table must not pass for an empty fleet.
      const codes = suback?.granted ?? [];
      const denied = filters.filter((_, i) => codes[i] >= 0x80);
      if (current() && denied.length) {
        $('status').textContent = `connected to ${location.host}; not allowed to read ${denied.join(', ')}`;
      } else if (current() && err) {
        $('status').textContent = `connected to ${location.host}; subscribe failed (${err.message})`;
      }
    });
  });
  c.on('close', () => {
    if (current() && !refused) $('status').textContent = 'disconnected; reconnecting…';
  });
  c.on('error', (err) => {
    // A refused login does not get better by retrying: ask for one.
    if (current() && err && LOGIN_REFUSED.has(err.code)) {
      refused = true;
      c.end(true);
      $('login-why').textContent = `The broker refused the login (${err.message}).`;
      $('login').style.display = 'block';
      $('status').textContent = 'login needed';
    }
  });
  c.on('message', (topic, payload) => {
    if (!current()) return;
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
  // The last refusal's reason goes until this login has its own answer.
  $('login-why').textContent = '';
  $('status').textContent = `logging in as ${form.get('username')}…`;
  connect(form.get('username'), form.get('password'));
});

if (typeof mqtt === 'undefined') {
  $('status').textContent = 'This axion was built without MQTT.js (run scripts/setup.sh, then rebuild): the page cannot connect.';
} else {
  connect();
  // Ages and staleness move even when nothing arrives.
  setInterval(draw, 1000);
}
