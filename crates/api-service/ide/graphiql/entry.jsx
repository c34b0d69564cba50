// The GraphiQL page's code: GraphiQL 5 with its toolkit's fetcher, HTTP to this page's server
// and subscriptions (and whatever else the page sends on the socket) over graphql-ws to the
// same host's ws(s)://…/graphql/. The headers typed in the page go with HTTP requests and as the
// socket's connectionParams.
import React from 'react';
import { createRoot } from 'react-dom/client';
import { GraphiQL } from 'graphiql';
import { createGraphiQLFetcher } from '@graphiql/toolkit';
import { parse } from 'graphql';
import 'graphiql/style.css';

// Monaco's workers are files of their own next to this one (no blob: or data: code).
const here = new URL('.', document.currentScript?.src ?? window.location.href);
globalThis.MonacoEnvironment = {
  getWorker(_workerId, label) {
    const name = label === 'json' ? 'json' : label === 'graphql' ? 'graphql' : 'editor';
    return new Worker(new URL(`${name}.worker.js`, here));
  },
};

const scheme = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
const toolkitFetcher = createGraphiQLFetcher({
  url: `${window.location.origin}/graphql/`,
  subscriptionUrl: `${scheme}//${window.location.host}/graphql/`,
});
// The toolkit sends an operation over the socket when the document GraphiQL hands it is a
// subscription; that document is parsed after a pause in typing, so a subscription run right
// after an edit went over HTTP (and was refused there). Parse what is actually sent.
const fetcher = (params, options) => {
  let documentAST = options?.documentAST;
  try {
    documentAST = parse(params.query);
  } catch {
    // Not a document: HTTP answers with the syntax error.
  }
  return toolkitFetcher(params, { ...options, documentAST });
};

createRoot(document.getElementById('graphiql')).render(
  React.createElement(GraphiQL, {
    fetcher,
    defaultQuery: 'subscription {\n  carModelUpdated(pk: 1) {\n    make\n    model\n  }\n}\n',
    defaultHeaders: '{\n  "Authorization": "Bearer <access token>"\n}',
    shouldPersistHeaders: false,
  }),
);
