"""The test hosts' TCP servers, run inside a TestNet's network namespace (testnet.rs).

argv[1] is a JSON object:
  http: [[addr, port, label], ...]            HTTP/1.x; body "server=LABEL host=HOST\n"
  tls:  [[addr, port, label, cert, key], ...] the same over TLS
  sink: [[addr, port], ...]                   reads to EOF, answers "received N\n"
  echo: [[addr, port], ...]                   sends back what it reads
  sink_total: path                            total bytes all sinks received, rewritten
                                              after every connection
Every socket is bound before "ready" is printed on stdout; the process then serves until
killed. Standard library only: it also runs on machines without extra Python packages.
"""
import http.server
import json
import socket
import socketserver
import ssl
import sys
import threading

conf = json.loads(sys.argv[1])
total_lock = threading.Lock()
total = [0]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        host = self.headers.get("Host", "")
        body = f"server={self.server.label} host={host} path={self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s\n" % (self.server.label, fmt % args))


class Server(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True

    def server_bind(self):
        # HTTPServer.server_bind asks the resolver for the address's name (getfqdn), which
        # inside the namespace waits for a DNS server it cannot reach.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class TlsServer(Server):
    def get_request(self):
        conn, addr = super().get_request()
        # The handshake happens in the handler's thread (do_handshake_on_connect), so a
        # client that never finishes it blocks only itself.
        return self.ctx.wrap_socket(conn, server_side=True), addr

    def handle_error(self, request, client_address):
        sys.stderr.write(f"{self.label}: error from {client_address}: {sys.exc_info()[1]}\n")


class Sink(socketserver.BaseRequestHandler):
    def handle(self):
        n = 0
        while True:
            b = self.request.recv(1 << 16)
            if not b:
                break
            n += len(b)
        with total_lock:
            total[0] += n
            with open(conf["sink_total"], "w") as f:
                f.write(str(total[0]))
        self.request.sendall(f"received {n}\n".encode())


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            b = self.request.recv(1 << 16)
            if not b:
                break
            self.request.sendall(b)


class Tcp(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


servers = []
for addr, port, label in conf.get("http", []):
    s = Server((addr, port), Handler)
    s.label = label
    servers.append(s)
for addr, port, label, cert, key in conf.get("tls", []):
    s = TlsServer((addr, port), Handler)
    s.label = label
    s.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    s.ctx.load_cert_chain(cert, key)
    servers.append(s)
for addr, port in conf.get("sink", []):
    servers.append(Tcp((addr, port), Sink))
for addr, port in conf.get("echo", []):
    servers.append(Tcp((addr, port), Echo))
for s in servers:
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
