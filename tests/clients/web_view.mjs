// Drives the fleet view page in headless Chromium for tests/web_view.rs.
// Usage: node web_view.mjs <page url> <service>
// Prints `connected` once the page is connected, `seen <seconds after the
// record's timestamp>` once the service's row shows online, then
// `offline <state cell>` once the row turns offline, and exits 0. Any
// failure exits 1 with the reason on stderr.
import { chromium } from 'playwright-core';

const [url, service] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_PATH || '/usr/bin/chromium',
  args: ['--no-sandbox'],
});
try {
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  await page.goto(url);
  await page.waitForFunction(() => document.getElementById('status').textContent.startsWith('connected'), null, { timeout: 10000 });
  console.log('connected');
  const row = `tr[data-topic$="/heartbeat/${service}/"], tr[data-topic*="/heartbeat/${service}/"]`;
  const handle = await page.waitForSelector(`${row}[data-state="online"]`, { timeout: 20000 });
  const lag = await handle.evaluate((tr) => Date.now() / 1000 - Number(tr.dataset.ts));
  console.log(`seen ${lag.toFixed(3)}`);
  const off = await page.waitForSelector(`${row}[data-state="offline"]`, { timeout: 20000 });
  console.log(`offline ${await off.evaluate((tr) => tr.children[3].textContent)}`);
  if (errors.length) throw new Error(`page errors: ${errors.join('; ')}`);
} catch (e) {
  console.error(String(e));
  process.exitCode = 1;
} finally {
  await browser.close();
}
