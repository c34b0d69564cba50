// resume.mjs's subscriber over GraphQL over SSE: the npm `graphql-sse` client (distinct
// connections mode) retrying forever, a fresh token in the `Authorization` header at every
// (re)connect, and the last result's `extensions.cursor` sent back as `Last-Event-ID`, so that a
// reconnect (a gateway restarting, a token expiring) resumes where the stream stopped.
//
//   node resume-sse.mjs --url http://127.0.0.1:8000/graphql/ --http http://127.0.0.1:8000
//
// It logs in as admin/letmein at --http for each token. Output on stdout, a JSON object a line:
//   {"connected":N}                           the Nth stream was accepted
//   {"make":…,"cursor":…,"recovered":…,"skipped":…}   each result of carModelUpdated(pk: 1)
//   {"reconnecting":N}                        the stream ended without `complete`; retry N
//   {"error":…}                               a result with errors (the stream's last), or the
//                                             subscription failed for good (exit 1)
// It runs until its stdin closes, then prints {"done":true} and exits 0.

import { parseArgs } from 'node:util';
import { createClient } from 'graphql-sse';

const { url, http } = parseArgs({
  options: {
    url: { type: 'string' },
    http: { type: 'string' },
  },
}).values;
if (!url || !http) {
  console.error('usage: node resume-sse.mjs --url HTTP_URL --http HTTP_BASE_URL');
  process.exit(2);
}

const print = (value) => process.stdout.write(JSON.stringify(value) + '\n');

async function freshToken() {
  const response = await fetch(`${http}/api/token/`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ username: 'admin', password: 'letmein' }),
  });
  if (!response.ok) {
    throw new Error(`login: HTTP ${response.status}`);
  }
  return (await response.json()).access;
}

let cursor;
let connections = 0;
const client = createClient({
  url,
  retryAttempts: Infinity,
  retry: async (retries) => {
    print({ reconnecting: retries + 1 });
    await new Promise((resolve) => setTimeout(resolve, Math.min(1000, 50 * 2 ** retries)));
  },
  // Evaluated at every (re)connect: a fresh token, and where to resume from.
  headers: async () => ({
    Authorization: `Bearer ${await freshToken()}`,
    ...(cursor ? { 'Last-Event-ID': cursor } : {}),
  }),
  on: {
    connected: () => {
      connections += 1;
      print({ connected: connections });
    },
  },
});

client.subscribe(
  { query: 'subscription { carModelUpdated(pk: 1) { id make } }' },
  {
    next: (result) => {
      if (result.errors) {
        print({ error: result.errors });
        return;
      }
      const { cursor: received, recovered, skipped } = result.extensions ?? {};
      if (received) {
        cursor = received;
      }
      print({ make: result.data.carModelUpdated.make, cursor: received, recovered, skipped });
    },
    error: (err) => {
      print({ error: String(err?.message ?? JSON.stringify(err)) });
      process.stdout.write('', () => process.exit(1));
    },
    complete: () => {},
  },
);

process.stdin.resume();
process.stdin.on('end', () => {
  print({ done: true });
  process.stdout.write('', () => process.exit(0));
});
