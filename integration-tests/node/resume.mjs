// A subscriber that loses nothing, set up as the README's client recipe: the npm `graphql-ws`
// client retrying forever, a fresh token from `connectionParams` at every (re)connect, the last
// result's `extensions.cursor` kept and sent back as `extensions.resumeFrom` when it
// resubscribes, and (with --renew) the token renewed in band 30 s before it expires (halfway
// through its life when that is shorter).
//
//   node resume.mjs --url ws://127.0.0.1:8000/graphql/ --http http://127.0.0.1:8000 [--renew]
//                   [--resume-from CURSOR] [--renew-with TOKEN]
//
// --resume-from: the first subscription already resumes from CURSOR (a client restarted with a
// cursor it saved). --renew-with: right after the first connection, renew with TOKEN (the tests
// give another user's, which the server must refuse with 4403).
//
// It logs in as admin/letmein at --http for each token. Output on stdout, a JSON object a line:
//   {"connected":N}                           the Nth connection was acknowledged
//   {"make":…,"cursor":…,"recovered":…,"skipped":…}   each result of carModelUpdated(pk: 1)
//   {"renewed":EXP}                           a renewal answered by the server
//   {"closed":CODE,"reason":…}                the socket closed (the client reconnects)
//   {"error":…}                               the subscription failed for good (exit 1)
// It runs until its stdin closes, then prints {"done":true} and exits 0.

import { parseArgs } from 'node:util';
import { createClient } from 'graphql-ws';
import WebSocket from 'ws';

const { url, http, renew, 'resume-from': resumeFrom, 'renew-with': renewWith } = parseArgs({
  options: {
    url: { type: 'string' },
    http: { type: 'string' },
    renew: { type: 'boolean', default: false },
    'resume-from': { type: 'string' },
    'renew-with': { type: 'string' },
  },
}).values;
if (!url || !http) {
  console.error('usage: node resume.mjs --url WS_URL --http HTTP_BASE_URL [--renew]');
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

const expiryOf = (token) =>
  JSON.parse(Buffer.from(token.split('.')[1], 'base64url').toString()).exp;

let connections = 0;
let renewal;
const client = createClient({
  url,
  webSocketImpl: WebSocket,
  // Never give up: token expiry (4403), a replica's restart (1001) and a slow reader (1013)
  // all end in a reconnect that resumes.
  retryAttempts: Infinity,
  shouldRetry: () => true,
  retryWait: async (retries) => new Promise((resolve) => setTimeout(resolve, Math.min(1000, 50 * 2 ** retries))),
  connectionParams: async () => ({ Authorization: `Bearer ${await freshToken()}` }),
  on: {
    connected: (socket) => {
      connections += 1;
      print({ connected: connections });
      if (renew) {
        scheduleRenewal(socket);
      }
      if (renewWith && connections === 1) {
        socket.send(JSON.stringify({ type: 'ping', payload: { Authorization: `Bearer ${renewWith}` } }));
      }
    },
    closed: (event) => {
      clearTimeout(renewal);
      print({ closed: event.code, reason: event.reason });
    },
    pong: (_received, payload) => {
      if (payload && payload.exp) {
        print({ renewed: payload.exp });
      }
    },
  },
});

// Renews 30 s before the token in force expires, or halfway through a shorter life.
function scheduleRenewal(socket, exp) {
  const left = (exp ?? Math.floor(Date.now() / 1000) + 1) * 1000 - Date.now();
  const wait = Math.max(left - 30_000, left / 2, 0);
  renewal = setTimeout(async () => {
    try {
      const token = await freshToken();
      socket.send(JSON.stringify({ type: 'ping', payload: { Authorization: `Bearer ${token}` } }));
      scheduleRenewal(socket, expiryOf(token));
    } catch (err) {
      print({ renewal_failed: String(err) });
    }
  }, wait);
}

// The same object is sent again at every resubscription: updating it is how the cursor travels.
const payload = {
  query: 'subscription { carModelUpdated(pk: 1) { id make } }',
  extensions: resumeFrom ? { resumeFrom } : {},
};
client.subscribe(payload, {
  next: (result) => {
    if (result.errors) {
      print({ error: result.errors });
      return;
    }
    const { cursor, recovered, skipped } = result.extensions ?? {};
    if (cursor) {
      payload.extensions.resumeFrom = cursor;
    }
    print({ make: result.data.carModelUpdated.make, cursor, recovered, skipped });
  },
  error: (err) => {
    print({ error: String(err?.message ?? JSON.stringify(err)) });
    process.stdout.write('', () => process.exit(1));
  },
  complete: () => {},
});

process.stdin.resume();
process.stdin.on('end', () => {
  print({ done: true });
  process.stdout.write('', () => process.exit(0));
});
