// One subscription with a third-party client, for the end-to-end suite (integration-tests/).
//
//   node subscribe.mjs --url ws://127.0.0.1:8000/graphql/ --client graphql-ws \
//        --token <access> [--query 'subscription { … }'] [--count 1]
//
// --client graphql-ws                   the `graphql-ws` package (subprotocol graphql-transport-ws),
//                                       connectionParams returning {Authorization: "Bearer <token>"}
// --client subscriptions-transport-ws   the legacy package (subprotocol graphql-ws), the same
//                                       connectionParams as an object
//
// Output on stdout, one JSON object a line, so the Rust tests can follow along:
//   {"connected":true}                  the server acknowledged connection_init
//   {"payload":{"data":…}}              each result the subscription delivered
//   {"error":…}                         why it failed (a close code and reason, a
//                                       connection_error payload, or GraphQL errors)
// Exit status: 0 after --count payloads; 1 after an error; 2 on bad arguments.
// Without --token, no connectionParams are sent at all.

import { parseArgs } from 'node:util';
import { createClient } from 'graphql-ws';
import subscriptionsTransportWs from 'subscriptions-transport-ws';
import WebSocket from 'ws';

const { SubscriptionClient } = subscriptionsTransportWs;

const DEFAULT_QUERY = 'subscription { carModelUpdated(pk: 1) { id make model } }';

function print(value) {
  process.stdout.write(JSON.stringify(value) + '\n');
}

let failed = false;
function fail(error) {
  if (failed) {
    return;
  }
  failed = true;
  print({ error });
  // Let stdout drain before exiting.
  process.stdout.write('', () => process.exit(1));
}

let options;
try {
  options = parseArgs({
    options: {
      url: { type: 'string' },
      client: { type: 'string' },
      token: { type: 'string' },
      query: { type: 'string', default: DEFAULT_QUERY },
      count: { type: 'string', default: '1' },
    },
  }).values;
} catch (err) {
  console.error(String(err));
  process.exit(2);
}
const count = Number.parseInt(options.count, 10);
if (!options.url || !options.client || !(count > 0)) {
  console.error('usage: node subscribe.mjs --url WS_URL --client graphql-ws|subscriptions-transport-ws [--token JWT] [--query Q] [--count N]');
  process.exit(2);
}
const connectionParams = options.token ? { Authorization: `Bearer ${options.token}` } : undefined;

let received = 0;
function onPayload(payload, done) {
  print({ payload });
  if (payload.errors) {
    fail({ graphql: payload.errors });
    return;
  }
  received += 1;
  if (received >= count) {
    done();
  }
}

function withGraphqlWs() {
  const client = createClient({
    url: options.url,
    webSocketImpl: WebSocket,
    // As the graphql-ws docs show it: a function, evaluated at each connection.
    connectionParams: () => connectionParams,
    retryAttempts: 0,
    lazy: false,
    on: {
      connected: () => print({ connected: true }),
      closed: (event) => {
        if (received < count) {
          fail({ close: { code: event?.code ?? null, reason: event?.reason ?? '' } });
        }
      },
    },
  });
  const finish = () => {
    unsubscribe();
    client.dispose();
    process.stdout.write('', () => process.exit(0));
  };
  const unsubscribe = client.subscribe(
    { query: options.query },
    {
      next: (payload) => onPayload(payload, finish),
      error: (error) => {
        // A CloseEvent, or an array of GraphQL errors.
        if (Array.isArray(error)) {
          fail({ graphql: error });
        } else if (error && typeof error.code === 'number') {
          fail({ close: { code: error.code, reason: error.reason ?? '' } });
        } else {
          fail({ message: String(error?.message ?? error) });
        }
      },
      complete: () => {
        if (received < count) {
          fail({ message: `the server completed the subscription after ${received} of ${count} results` });
        }
      },
    },
  );
}

function withSubscriptionsTransportWs() {
  const client = new SubscriptionClient(
    options.url,
    {
      connectionParams,
      reconnect: false,
      connectionCallback: (error) => {
        if (error) {
          fail({ connection_error: error });
        } else {
          print({ connected: true });
        }
      },
    },
    WebSocket,
  );
  client.onDisconnected(() => {
    if (received < count) {
      fail({ message: 'disconnected' });
    }
  });
  const subscription = client.request({ query: options.query }).subscribe({
    next: (payload) =>
      onPayload(payload, () => {
        subscription.unsubscribe();
        client.close();
        process.stdout.write('', () => process.exit(0));
      }),
    error: (error) => fail({ graphql: error }),
    complete: () => {
      if (received < count) {
        fail({ message: `the server completed the subscription after ${received} of ${count} results` });
      }
    },
  });
}

switch (options.client) {
  case 'graphql-ws':
    withGraphqlWs();
    break;
  case 'subscriptions-transport-ws':
    withSubscriptionsTransportWs();
    break;
  default:
    console.error(`unknown --client ${options.client}`);
    process.exit(2);
}
