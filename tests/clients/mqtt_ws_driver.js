// MQTT.js (a real MQTT client) for tests/mqtt_ws.rs, over MQTT over
// WebSocket (`ws://host:port/mqtt`) or plain TCP (`mqtt://host:port`): the
// same script on both, so the two transports can be compared.
//
// Usage: node mqtt_ws_driver.js '<json>' where the JSON has `mode`, `url`,
// `version` (4 or 5) and, as the mode needs: `topic`, `qos`, `count`,
// `username`, `password`, `clientId`, `n`.
// Modes:
//   sub     subscribes, prints {"event":"subscribed"}, then prints
//           {"event":"done","messages":[[payload,qos],...]} after `count`
//   pub     publishes `count` messages `msg-<i>` at `qos`, each awaited
//   connect one connection: {"event":"connack"} or {"event":"refused","code"}
//   acl     subscribes to and publishes (QoS 1) on `topic`: the codes
//   hold    opens `n` connections one by one, prints how many were refused
//           and with which code, and keeps the rest until stdin closes
//   wait_close  connects, prints {"event":"connected"}, then how the broker
//           ended it: {"event":"closed","reason":<DISCONNECT reason or null>}
// Prints JSON lines; exits 1 with a reason on failure.
import mqtt from "mqtt";

const cfg = JSON.parse(process.argv[2]);

function out(obj) {
  console.log(JSON.stringify(obj));
}

function fail(why) {
  console.error(`FAIL: ${why}`);
  process.exit(1);
}

// Nothing the test waits for takes this long; it bounds a hung run.
const watchdog = setTimeout(() => fail(`${cfg.mode}: no result within 60 s`), 60_000);
watchdog.unref();

function options(extra = {}) {
  return {
    protocolVersion: cfg.version ?? 5,
    clientId: cfg.clientId ?? `mqttjs-${process.pid}-${Math.random().toString(16).slice(2, 8)}`,
    username: cfg.username,
    password: cfg.password,
    clean: true,
    reconnectPeriod: 0,
    connectTimeout: 10_000,
    ...extra,
  };
}

// Resolves with the client once connected; rejects with the CONNACK's code
// (or the transport error) otherwise.
function connect(extra) {
  return new Promise((resolve, reject) => {
    const c = mqtt.connect(cfg.url, options(extra));
    const onError = (err) => {
      c.end(true);
      reject(err);
    };
    c.once("error", onError);
    c.once("close", () => onError(new Error("closed before CONNACK")));
    c.once("connect", () => {
      c.removeAllListeners("error");
      c.removeAllListeners("close");
      c.on("error", (err) => fail(`client error after connect: ${err.message}`));
      resolve(c);
    });
  });
}

const subscribe = (c, topic, qos) =>
  new Promise((resolve, reject) =>
    c.subscribe(topic, { qos }, (err, granted) => (err ? reject(err) : resolve(granted))),
  );

const publish = (c, topic, payload, qos) =>
  new Promise((resolve, reject) =>
    c.publish(topic, payload, { qos }, (err, packet) => (err ? reject(err) : resolve(packet))),
  );

const end = (c) => new Promise((resolve) => c.end(false, {}, resolve));

async function sub() {
  const c = await connect();
  const messages = [];
  const done = new Promise((resolve) => {
    c.on("message", (_topic, payload, packet) => {
      messages.push([payload.toString(), packet.qos]);
      if (messages.length === cfg.count) resolve();
    });
  });
  const granted = await subscribe(c, cfg.topic, cfg.qos);
  if (granted[0].qos !== cfg.qos) fail(`granted ${JSON.stringify(granted)}`);
  out({ event: "subscribed" });
  await done;
  await end(c);
  out({ event: "done", messages });
}

async function pub() {
  const c = await connect();
  for (let i = 0; i < cfg.count; i++) await publish(c, cfg.topic, `msg-${i}`, cfg.qos);
  await end(c);
  out({ event: "done", published: cfg.count });
}

async function connectOnce() {
  try {
    const c = await connect();
    await end(c);
    out({ event: "connack", code: 0 });
  } catch (err) {
    if (typeof err.code !== "number") fail(`no CONNACK: ${err.message}`);
    out({ event: "refused", code: err.code });
  }
}

async function acl() {
  const c = await connect();
  let suback;
  try {
    suback = (await subscribe(c, cfg.topic, 1))[0].qos;
  } catch (err) {
    // A refusal in the SUBACK comes as an error carrying the packet.
    suback = err.packet?.granted?.[0];
    if (typeof suback !== "number") throw err;
  }
  let puback;
  try {
    const packet = await publish(c, cfg.topic, "denied?", 1);
    puback = packet?.reasonCode ?? 0;
  } catch (err) {
    puback = err.code;
  }
  await end(c);
  out({ event: "acl", suback, puback });
}

async function hold() {
  const held = [];
  const refused = [];
  for (let i = 0; i < cfg.n; i++) {
    try {
      held.push(await connect({ clientId: `hold-${process.pid}-${i}` }));
    } catch (err) {
      if (typeof err.code !== "number") fail(`no CONNACK: ${err.message}`);
      refused.push(err.code);
    }
  }
  out({ event: "held", held: held.length, refused });
  clearTimeout(watchdog);
  process.stdin.resume();
  process.stdin.on("end", () => process.exit(0));
}

async function waitClose() {
  const c = await connect();
  out({ event: "connected" });
  clearTimeout(watchdog);
  const reason = await new Promise((resolve) => {
    c.on("disconnect", (packet) => resolve(packet.reasonCode ?? 0));
    c.on("close", () => resolve(null));
  });
  out({ event: "closed", reason });
  process.exit(0);
}

const modes = { sub, pub, connect: connectOnce, acl, hold, wait_close: waitClose };
const run = modes[cfg.mode] ?? (() => fail(`unknown mode ${cfg.mode}`));
run().catch((err) => fail(`${cfg.mode}: ${err.stack || err}`));
