// The walk-through in a real browser, for the end-to-end suite: Debian's chromium driven by
// playwright-core, on GraphQL Playground or GraphiQL as served by the stack (no other host).
//
//   node browser.mjs --base http://127.0.0.1:8000 --token <access>
//                    --ide playground|graphiql|eventsource [--shots DIR]
//
// Like a person: open /graphql/ (Playground) or /graphiql, set the HTTP headers to
// {"Authorization": "Bearer <access>"}, run `{ hi }` and wait for "Hi!", then run
// `subscription { carModelUpdated(pk: 1) { make model } }` and wait for an update (the test runs
// trigger-event meanwhile). Output, a JSON object a line:
//   {"hi":"<result pane>"}           `{ hi }` answered
//   {"listening":true}               the subscription is running: trigger events now
//   {"update":"<result pane>"}       an update is shown (screenshot <ide>-update.png)
//   {"offsite":[…],"errors":[…]}     requests to any other host, and page/console errors; last
// Exit status 0 when all of that happened with no off-site request and no error.

import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';

const { base, token, ide, shots } = parseArgs({
  options: {
    base: { type: 'string' },
    token: { type: 'string' },
    ide: { type: 'string' },
    shots: { type: 'string' },
  },
}).values;
if (!base || !token || !['playground', 'graphiql', 'eventsource'].includes(ide)) {
  console.error('usage: node browser.mjs --base HTTP_BASE_URL --token ACCESS --ide playground|graphiql|eventsource [--shots DIR]');
  process.exit(2);
}
const headers = JSON.stringify({ Authorization: `Bearer ${token}` }, null, 2);
const subscription = 'subscription {\n  carModelUpdated(pk: 1) {\n    make\n    model\n  }\n}';

/// Polls `read` until `test` accepts what it returns.
async function until(page, what, read, test, ms = 20_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const text = await read();
    if (test(text)) return text;
    if (Date.now() > deadline) throw new Error(`${what}; the result pane shows: ${text}`);
    await page.waitForTimeout(100);
  }
}

async function playground(page) {
  await page.goto(`${base}/graphql/`);
  const execute = page.locator('[title="Execute Query (Ctrl-Enter)"]');
  await execute.waitFor();
  // The editors are CodeMirror instances: the query, the variables/headers drawer, the results.
  const setValue = (n, text) =>
    page.locator('.CodeMirror').nth(n)
      .evaluate((element, value) => element.CodeMirror.setValue(value), text);
  const results = () =>
    page.evaluate(() =>
      [...document.querySelectorAll('.CodeMirror')].slice(2)
        .map((element) => element.CodeMirror?.getValue() ?? element.innerText).join('\n'));

  await page.getByText('HTTP HEADERS').click();
  await setValue(1, headers);
  await setValue(0, '{ hi }');
  await execute.click();
  print({ hi: await until(page, 'no "Hi!"', results, (text) => text.includes('"hi": "Hi!"')) });
  if (shots) await page.screenshot({ path: `${shots}/playground-hi.png` });

  await setValue(0, subscription);
  await execute.click();
  await page.getByText('Listening', { exact: false }).first().waitFor({ timeout: 20_000 });
  print({ listening: true });
  const update = await until(page, 'no update', results, (text) => text.includes('"carModelUpdated"'), 60_000);
  print({ update });
  if (shots) await page.screenshot({ path: `${shots}/playground-update.png` });
}

async function graphiql(page) {
  await page.goto(`${base}/graphiql`);
  const execute = page.locator('.graphiql-execute-button');
  await execute.waitFor();
  // Monaco editors: filled as a person pastes (typing would have brackets auto-closed).
  await page.context().grantPermissions(['clipboard-read', 'clipboard-write']);
  const replace = async (editor, text) => {
    await page.evaluate((value) => navigator.clipboard.writeText(value), text);
    await editor.click();
    await page.keyboard.press('ControlOrMeta+A');
    await page.keyboard.press('ControlOrMeta+V');
  };
  const results = () => page.locator('.result-window').innerText();

  await page.getByText('Headers', { exact: true }).click();
  await replace(page.locator('.monaco-editor[data-uri*="headers"]'), headers);
  await replace(page.locator('.graphiql-query-editor .monaco-editor').first(), '{ hi }');
  await execute.click();
  print({ hi: await until(page, 'no "Hi!"', results, (text) => /"hi":\s*"Hi!"/.test(text)) });
  if (shots) await page.screenshot({ path: `${shots}/graphiql-hi.png` });

  await replace(page.locator('.graphiql-query-editor .monaco-editor').first(), subscription);
  await execute.click();
  // While a subscription runs, the execute button is the stop button.
  await page.locator('.graphiql-execute-button[aria-label*="Stop" i]').waitFor({ timeout: 20_000 });
  print({ listening: true });
  const update = await until(page, 'no update', results, (text) => text.includes('"carModelUpdated"'), 60_000);
  print({ update });
  if (shots) await page.screenshot({ path: `${shots}/graphiql-update.png` });
}
// A page of the stack's origin using the browser's own EventSource, as a web app without a
// GraphQL client would: `{ hi }` by fetch, then the subscription as GraphQL over SSE by GET
// (an EventSource cannot set headers: the token goes as `access_token`). Each result's event id
// must be its cursor, which a reconnecting EventSource sends back as `Last-Event-ID`.
async function eventsource(page) {
  await page.goto(`${base}/graphql/`);
  const hi = await page.evaluate(async (token) => {
    const response = await fetch('/graphql/', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${token}` },
      body: JSON.stringify({ query: '{ hi }' }),
    });
    return JSON.stringify(await response.json());
  }, token);
  print({ hi });
  await page.evaluate(({ token, query }) => {
    window.updates = [];
    const params = new URLSearchParams({ query, access_token: token });
    const source = new EventSource(`/graphql/?${params}`);
    window.opened = new Promise((resolve) => { source.onopen = resolve; });
    source.addEventListener('next', (event) => {
      const cursor = JSON.parse(event.data).extensions?.cursor;
      window.updates.push({ data: event.data, idIsCursor: event.lastEventId === cursor });
    });
  }, { token, query: subscription });
  await page.evaluate(() => window.opened);
  print({ listening: true });
  const update = await until(page, 'no update', () => page.evaluate(() => JSON.stringify(window.updates[0] ?? null)),
    (text) => text !== 'null', 60_000);
  const { data, idIsCursor } = JSON.parse(update);
  if (!idIsCursor) throw new Error(`the event's id is not its cursor: ${update}`);
  print({ update: data });
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

  await ({ playground, graphiql, eventsource })[ide](page);
} catch (err) {
  failed = true;
  errors.push(`test: ${err.message}`);
  if (shots) await browser.contexts()[0]?.pages()[0]?.screenshot({ path: `${shots}/${ide}-failure.png` }).catch(() => {});
} finally {
  await browser.close();
}
print({ offsite, errors });
process.exit(failed || offsite.length > 0 || errors.length > 0 ? 1 : 0);
