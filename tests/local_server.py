"""An HTTP server on 127.0.0.1 for the tests that stand in for a download source (the zoo's
mirrors, the Hugging Face Hub, a sweep's files): nothing leaves the machine."""

import http.server
import threading


class LocalServer:
  """Serves `handler` (a BaseHTTPRequestHandler class) on a free port in a daemon thread, one
  thread per request; `url` is its base, 'http://127.0.0.1:PORT'. With `quiet_errors`, a
  connection the client breaks off is not reported (a killed download's). `close()` stops it."""

  def __init__(self, handler, quiet_errors: bool = False):
    server_class = _Quiet if quiet_errors else http.server.ThreadingHTTPServer
    self.httpd = server_class(('127.0.0.1', 0), handler)
    self.httpd.daemon_threads = True
    self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def close(self) -> None:
    self.httpd.shutdown()
    self.httpd.server_close()


class _Quiet(http.server.ThreadingHTTPServer):
  def handle_error(self, request, client_address):
    pass
