// Drives the fleet view page with auth on, in headless Chromium, for
// tests/web_view.rs. Usage:
//   node web_login.mjs <page url> <service> <queue> <user> <password> <watcher> <watcher password>
// Prints one line per step, for the test to check:
//   form <visible> <why>          the page opened without credentials
//   refused <visible> <why>       after <user> with a wrong password
//   connected <visible>           after <user> with <password> (the form's visibility)
//   queue <depth>                 <queue>'s row shows
//   seen <seconds>                <service>'s row shows online, that long after its record's timestamp
//   watcher <instances> <queues> <status>   <watcher> logged in: rows shown once <queue>'s row is there
// and exits 0. Any failure exits 1 with the reason on stderr.
import { chromium } from 'playwright-core';

const [url, service, queue, user, password, watcher, watcherPassword] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_PATH || '/usr/bin/chromium',
  args: ['--no-sandbox'],
});
const errors = [];
const text = (page, id) => page.evaluate((i) => document.getElementById(i).textContent, id);
const visible = (page) => page.isVisible('#login');
const statusIs = (page, pred) =>
  page.waitForFunction(pred, null, { timeout: 20000 });

// A fresh page (its own context: no shared storage) at the login form.
async function openAtForm() {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.on('pageerror', (e) => errors.push(String(e)));
  await page.goto(url);
  await statusIs(page, () => document.getElementById('status').textContent === 'login needed');
  return page;
}

// Submits the form; the page clears the last reason at once, so what
// follows is this login's answer.
async function login(page, name, secret) {
  await page.fill('#login input[name="username"]', name);
  await page.fill('#login input[name="password"]', secret);
  await page.click('#login button[type="submit"]');
  await statusIs(page, () => {
    const s = document.getElementById('status').textContent;
    return s === 'login needed' || s.startsWith('connected');
  });
}

try {
  const page = await openAtForm();
  console.log(`form ${await visible(page)} ${await text(page, 'login-why')}`);

  await login(page, user, `${password}-wrong`);
  console.log(`refused ${await visible(page)} ${await text(page, 'login-why')}`);

  await login(page, user, password);
  console.log(`connected ${await visible(page)}`);
  const qrow = await page.waitForSelector(`tr[data-queue="${queue}"]`, { timeout: 20000 });
  console.log(`queue ${await qrow.evaluate((tr) => tr.children[2].textContent)}`);
  const row = `tr[data-topic*="/heartbeat/${service}/"][data-state="online"]`;
  const handle = await page.waitForSelector(row, { timeout: 20000 });
  const lag = await handle.evaluate((tr) => Date.now() / 1000 - Number(tr.dataset.ts));
  console.log(`seen ${lag.toFixed(3)}`);

  // Another login, whose ACL lets it read the queue stats but no
  // heartbeat. The page subscribes to the heartbeats first and the broker
  // sends retained messages in filter order: once the queue's row is
  // there, any record that was going to come has come.
  const other = await openAtForm();
  await login(other, watcher, watcherPassword);
  await other.waitForSelector(`tr[data-queue="${queue}"]`, { timeout: 20000 });
  await statusIs(other, () => document.getElementById('status').textContent.includes('not allowed'));
  const counts = await other.evaluate(() => [
    document.querySelectorAll('#instances tr').length,
    document.querySelectorAll('#queues tr').length,
  ]);
  console.log(`watcher ${counts[0]} ${counts[1]} ${await text(other, 'status')}`);
  if (errors.length) throw new Error(`page errors: ${errors.join('; ')}`);
} catch (e) {
  console.error(String(e));
  process.exitCode = 1;
} finally {
  await browser.close();
}
