# Transfers that are sure to be in flight when a test's event comes (an
# upgrade, a crash), however slow the machine: they send a first part at
# full speed, then trickle 64 KiB every 50 ms, and send the rest only once
# the test has created the file GATE. They never trickle past 90 %.
#
#   http HOST PORT FILE GATE
#       an HTTP/1.0 server: GET /big answers FILE that way; any other GET
#       a short page at once. Prints "listening" when ready.
#   echo SIZE GATE
#       a same-host echo over 127.0.0.1: one connection, SIZE pseudo-random
#       bytes sent that way and echoed back, every byte checked. Prints
#       "started" once data flows and "ok SIZE" at the end; exits 1 on any
#       difference.
import hashlib
import http.server
import os
import random
import socket
import sys
import threading
import time

CHUNK = 64 * 1024

# recv(): tests/common/sockmap_recv.py, prepended.


def gated_send(write, data, gate):
    first = len(data) // 4
    write(data[:first])
    sent = first
    ceiling = len(data) * 9 // 10
    while not os.path.exists(gate) and sent < ceiling:
        write(data[sent : sent + CHUNK])
        sent += min(CHUNK, len(data) - sent)
        time.sleep(0.05)
    while not os.path.exists(gate):
        time.sleep(0.05)
    write(data[sent:])


def serve_http(host, port, path, gate):
    data = open(path, "rb").read()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = data if self.path == "/big" else b"ok\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path == "/big":
                gated_send(self.wfile.write, body, gate)
            else:
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((host, int(port)), Handler)
    server.daemon_threads = True
    print("listening", flush=True)
    server.serve_forever()


def echo(size, gate):
    data = random.Random(size).randbytes(size)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()

    def serve():
        while True:
            chunk = recv(server, CHUNK)
            if not chunk:
                server.shutdown(socket.SHUT_WR)
                return
            server.sendall(chunk)

    threading.Thread(target=serve, daemon=True).start()
    received = hashlib.sha256()
    count = [0]

    def read():
        while True:
            chunk = recv(client, CHUNK)
            if not chunk:
                return
            received.update(chunk)
            count[0] += len(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    print("started", flush=True)
    gated_send(client.sendall, data, gate)
    client.shutdown(socket.SHUT_WR)
    reader.join()
    if count[0] != size or received.digest() != hashlib.sha256(data).digest():
        print("echoed %d bytes, not the %d sent, or others" % (count[0], size), flush=True)
        sys.exit(1)
    print("ok %d" % size, flush=True)


if sys.argv[1] == "http":
    serve_http(*sys.argv[2:6])
else:
    echo(int(sys.argv[2]), sys.argv[3])
