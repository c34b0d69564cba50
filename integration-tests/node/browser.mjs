// The walk-through in a real browser, for the end-to-end suite: Debian's chromium driven by
// playwright-core, on GraphQL Playground as served by the stack (no other host).
//
//   node browser.mjs --base http://127.0.0.1:8000 --token <access> [--shots DIR]
//
// Like a person: open /graphql/, set HTTP HEADERS to {"Authorization": "Bearer <access>"}, run
// `{ hi }` and wait for "Hi!", then run `subscription { carModelUpdated(pk: 1) { make model } }`
// and wait for an update (the test runs trigger-event meanwhile). Output, a JSON object a line:
//   {"hi":"<result pane>"}           `{ hi }` answered
//   {"listening":true}               the subscription is running: trigger events now
//   {"update":"<result pane>"}       an update is shown (screenshot playground-update.png)
//   {"offsite":[…],"errors":[…]}     requests to any other host, and page/console errors; last
// Exit status 0 when all of that happened with no off-site request and no error.

import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';

const { base, token, shots } = parseArgs({
  options: { base: { type: 'string' }, token: { type: 'string' }, shots: { type: 'string' } },
}).values;
if (!base || !token) {
  console.error('usage: node browser.mjs --base HTTP_BASE_URL --token ACCESS [--shots DIR]');
  process.exit(2);
}
const print = (value) => process.stdout.write(JSON.stringify(value) + '\n');
const origin = new URL(base).host;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
});
const offsite = [];
const errors = [];
let failed = false;
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 720 } });
  page.on('request', (request) => {
    const url = new URL(request.url());
    if (!['http:', 'https:', 'ws:', 'wss:'].includes(url.protocol)) return; // data:, blob:
    if (url.host !== origin) offsite.push(request.url());
  });
  page.on('websocket', (socket) => {
    if (new URL(socket.url()).host !== origin) offsite.push(socket.url());
  });
  page.on('pageerror', (err) => errors.push(`page: ${err.message}`));
  page.on('console', (message) => {
    if (message.type() === 'error') errors.push(`console: ${message.text()}`);
  });

  await page.goto(`${base}/graphql/`);
  const execute = page.locator('[title="Execute Query (Ctrl-Enter)"]');
  await execute.waitFor();
  // The editors are CodeMirror instances: the query, the variables/headers drawer, the results.
  const editor = (n) => page.locator('.CodeMirror').nth(n);
  const setValue = (n, text) =>
    editor(n).evaluate((element, value) => element.CodeMirror.setValue(value), text);
  const results = () =>
    page.evaluate(() =>
      [...document.querySelectorAll('.CodeMirror')].slice(2)
        .map((element) => element.CodeMirror?.getValue() ?? element.innerText).join('\n'));
  const until = async (what, test, ms = 20_000) => {
    const deadline = Date.now() + ms;
    for (;;) {
      const text = await results();
      if (test(text)) return text;
      if (Date.now() > deadline) throw new Error(`${what}; the result pane shows: ${text}`);
      await page.waitForTimeout(100);
    }
  };

  await page.getByText('HTTP HEADERS').click();
  await setValue(1, JSON.stringify({ Authorization: `Bearer ${token}` }, null, 2));
  await setValue(0, '{ hi }');
  await execute.click();
  print({ hi: await until('no "Hi!"', (text) => text.includes('"hi": "Hi!"')) });
  if (shots) await page.screenshot({ path: `${shots}/playground-hi.png` });

  await setValue(0, 'subscription {\n  carModelUpdated(pk: 1) {\n    make\n    model\n  }\n}');
  await execute.click();
  await page.getByText('Listening', { exact: false }).first().waitFor({ timeout: 20_000 });
  print({ listening: true });
  const update = await until('no update', (text) => text.includes('"carModelUpdated"'), 60_000);
  print({ update });
  if (shots) await page.screenshot({ path: `${shots}/playground-update.png` });
} catch (err) {
  failed = true;
  errors.push(`test: ${err.message}`);
} finally {
  await browser.close();
}
print({ offsite, errors });
process.exit(failed || offsite.length > 0 || errors.length > 0 ? 1 : 0);
