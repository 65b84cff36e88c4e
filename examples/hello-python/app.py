"""A small Python web app using only the standard library.

It listens on $PORT (Stead sets it) and answers `GET /` with a greeting that
names the version serving it, and `GET /healthz` with `ok`.
"""

import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MESSAGE = "Hello from Python on Stead"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/healthz":
            body = b"ok\n"
        elif self.path == "/":
            body = (
                f"{MESSAGE} (app {os.environ.get('STEAD_APP', '')}, "
                f"version {os.environ.get('STEAD_VERSION', '')}, "
                f"instance {os.environ.get('STEAD_INSTANCE', '')})\n"
            ).encode()
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        sys.stdout.write("%s %s\n" % (self.address_string(), fmt % args))
        sys.stdout.flush()


def main():
    port = int(os.environ.get("PORT", "8000"))
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    # Stop cleanly on SIGTERM, as Stead asks before its grace period ends.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"hello-python listening on port {port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
