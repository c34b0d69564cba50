#!/usr/bin/env python3
"""An OTLP/HTTP receiver that takes every export and keeps nothing but counts: the other end of
the tracing-cost benchmark (scripts/bench/tracing-cost). Answers 200 to POST /v1/traces.

    scripts/bench/otlp-sink.py PORT
"""
import http.server
import signal
import sys


class Sink(http.server.BaseHTTPRequestHandler):
    exports = 0
    received = 0

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        self.rfile.read(length)
        Sink.exports += 1
        Sink.received += length
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink)
try:
    server.serve_forever()
finally:
    print(f"{Sink.exports} exports, {Sink.received} bytes", file=sys.stderr)
