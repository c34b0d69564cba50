// Starts GraphQL Playground on this page (a file rather than an inline script, so the page's
// Content-Security-Policy can refuse every inline script). HTTP goes to the page's own URL, and
// subscriptions, queries and mutations sent on the socket to the same URL's ws(s)://.
window.addEventListener('load', function () {
  var scheme = window.location.protocol === 'https:' ? 'wss://' : 'ws://';
  window.GraphQLPlayground.init(document.getElementById('root'), {
    endpoint: window.location.pathname,
    subscriptionEndpoint: scheme + window.location.host + window.location.pathname,
    settings: {
      'request.credentials': 'same-origin',
      'schema.polling.enable': false,
    },
  });
});
