// Apollo Client 4 with its HttpLink only (no websocket link), for the end-to-end suite: a
// subscription goes over Apollo's multipart protocol, a query or mutation as plain HTTP.
//
//   node apollo.mjs --url http://127.0.0.1:8000/graphql/ --token <access> \
//        --query 'subscription { … }' [--count 1] [--persisted]
//
// --persisted: Apollo's persisted-queries link in front (automatic persisted queries: the hash
// first, the document only when the server asks for it); the requests it made are printed as
// {"requests":[{"hashOnly":…,"code":…}, …]} before the result.
//
// Output on stdout, one JSON object a line:
//   {"subscribed":true}        the subscription was sent
//   {"data":…}                 each result
//   {"error":…}                why it failed (exit 1)
// Exit status: 0 after --count results.

import { createHash } from 'node:crypto';
import { parseArgs } from 'node:util';
import { ApolloClient, HttpLink, InMemoryCache, gql } from '@apollo/client';
import { PersistedQueryLink } from '@apollo/client/link/persisted-queries';

const { url, token, query, count, persisted } = parseArgs({
  options: {
    url: { type: 'string' },
    token: { type: 'string' },
    query: { type: 'string' },
    count: { type: 'string', default: '1' },
    persisted: { type: 'boolean', default: false },
  },
}).values;
if (!url || !query) {
  console.error('usage: node apollo.mjs --url HTTP_URL --token JWT --query Q [--count N]');
  process.exit(2);
}
const wanted = Number.parseInt(count, 10);
const print = (value) => process.stdout.write(JSON.stringify(value) + '\n');
const exit = (code) => process.stdout.write('', () => process.exit(code));

// What went over the wire, for --persisted: whether the document was left out, and the answer's
// error code if any.
const requests = [];
async function recordingFetch(input, init) {
  const response = await fetch(input, init);
  const sent = JSON.parse(init?.body ?? '{}');
  // A subscription's multipart body streams on: only JSON answers are read here.
  const json = (response.headers.get('content-type') ?? '').includes('json');
  const answer = json ? await response.clone().json().catch(() => ({})) : {};
  requests.push({ hashOnly: !sent.query, code: answer.errors?.[0]?.extensions?.code ?? null });
  return response;
}

const http = new HttpLink({
  uri: url,
  headers: token ? { Authorization: `Bearer ${token}` } : {},
  fetch: recordingFetch,
});
const sha256 = (text) => createHash('sha256').update(text).digest('hex');
const client = new ApolloClient({
  link: persisted ? new PersistedQueryLink({ sha256 }).concat(http) : http,
  cache: new InMemoryCache(),
});

const document = gql(query);
const isSubscription = document.definitions.some(
  (definition) => definition.kind === 'OperationDefinition' && definition.operation === 'subscription',
);
if (isSubscription) {
  let received = 0;
  client.subscribe({ query: document }).subscribe({
    next: (result) => {
      if (result.error) {
        print({ error: result.error.message ?? String(result.error) });
        exit(1);
        return;
      }
      print({ data: result.data });
      received += 1;
      if (received >= wanted) {
        exit(0);
      }
    },
    error: (err) => {
      print({ error: err?.message ?? String(err) });
      exit(1);
    },
    complete: () => {
      if (received < wanted) {
        print({ error: `completed after ${received} of ${wanted} results` });
        exit(1);
      }
    },
  });
  print({ subscribed: true });
} else {
  const operation = document.definitions[0].operation === 'mutation'
    ? client.mutate({ mutation: document })
    : client.query({ query: document, fetchPolicy: 'network-only' });
  operation
    .then((result) => {
      if (persisted) print({ requests });
      print({ data: result.data });
      exit(0);
    })
    .catch((err) => {
      print({ error: err?.message ?? String(err) });
      exit(1);
    });
}
