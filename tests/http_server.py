"""A local http server for the download tests (127.0.0.1, a free port, its own thread), and a URL
nothing answers on.  Import ``server`` into a test module to use it as a fixture."""
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class Server:
    """A local http server (127.0.0.1, a free port, its own thread) whose answers the test sets:
    ``files`` (path -> bytes), ``truncated`` (paths whose body stops halfway, Content-Length saying
    the whole), ``redirects`` (path -> Location), ``slow`` (paths answered after SLOW seconds);
    ``requests`` lists the paths asked for."""
    SLOW = 1.5

    def __init__(self):
        self.files, self.truncated, self.redirects, self.slow = {}, set(), {}, set()
        self.requests = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.owner = self
        self.httpd.handle_error = lambda request, address: None     # a client gone early is what some tests do
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def url(self, path):
        return "http://127.0.0.1:%d%s" % (self.httpd.server_port, path)

    def serve(self, path, body):
        self.files[path] = body
        return self.url(path)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        owner = self.server.owner
        owner.requests.append(self.path)
        if self.path in owner.slow:
            time.sleep(owner.SLOW)
        if self.path in owner.redirects:
            self.send_response(302)
            self.send_header("Location", owner.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = owner.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in owner.truncated:
            self.wfile.write(body[:len(body) // 2])
            self.close_connection = True        # the connection closes with half the body sent
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = Server()
    yield srv
    srv.close()


def refused_url():
    """A URL on a port nothing listens on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return "http://127.0.0.1:%d/x.qcow2" % port
