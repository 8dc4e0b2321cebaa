# SO_ORIGINAL_DST proxies and clients that know nothing of BPF, for the
# tests of `redirect` on a host full of containers.
#
#   sidecar DEST_PREFIX COUNT CONCURRENCY SOURCE_PORT_BASE HOLD_S GO_FILE
#       A proxy on 127.0.0.1:15001 and its clients in one process, as a
#       container with a sidecar would have. Once GO_FILE exists, COUNT
#       clients (CONCURRENCY at a time) connect to DEST_PREFIX.<1..250>:80,
#       each from port SOURCE_PORT_BASE + i (0: the kernel picks), and send
#       one byte; the proxy waits HOLD_S, asks SO_ORIGINAL_DST and answers
#       with what it was told. Prints "ok COUNT" when every client was told
#       its own destination, else "wrong ..." lines, and exits 1.
#   holder
#       A proxy on 127.0.0.1:15001 that asks SO_ORIGINAL_DST of each
#       accepted connection and keeps it open: prints "held CLIENT_PORT
#       ANSWER".
#   probe CLIENT_PORT
#       What another user can read: getsockopt(SO_ORIGINAL_DST) on a UDP
#       socket on the proxy's side of the tuple (127.0.0.1:15001 ->
#       127.0.0.1:CLIENT_PORT), on both ends of a TCP connection of its own,
#       and on a connection to the proxy. One line each: "NAME errno N" or
#       "NAME answered ADDR".
#   fastopen-proxy
#       A proxy on 127.0.0.1:15001 that accepts data in the SYN: per
#       connection reads the request, answers "CLIENT_PORT ANSWER" and
#       closes first (so the client's end does not hold the tuple in
#       TIME_WAIT); prints the same line.
#   fastopen-clients DEST COUNT
#       COUNT connections to DEST:80 with the request in the SYN
#       (MSG_FASTOPEN); prints each answer line it gets back.
#   connect-from CLIENT_PORT
#       A plain connection from 127.0.0.1:CLIENT_PORT straight to the proxy;
#       prints its answer line.
import os
import socket
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

SO_ORIGINAL_DST = 80
MSG_FASTOPEN = 0x20000000
TCP_FASTOPEN = 23


def original_dst(sock):
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError as e:
        return "errno %d" % e.errno
    port, = struct.unpack("!H", raw[2:4])
    return "%s:%d" % (socket.inet_ntoa(raw[4:8]), port)


def listener(fastopen=False):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fastopen:
        s.setsockopt(socket.SOL_TCP, TCP_FASTOPEN, 64)
    s.bind(("127.0.0.1", 15001))
    s.listen(4096)
    return s


def serve(lst, handler):
    def loop():
        while True:
            conn, peer = lst.accept()
            threading.Thread(target=handler, args=(conn, peer), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


def recv_until_closed(sock):
    data = b""
    while True:
        part = sock.recv(4096)
        if not part:
            return data
        data += part


def sidecar(prefix, count, concurrency, port_base, hold, go_file):
    def answer(conn, peer):
        with conn:
            conn.settimeout(60)
            conn.recv(1)
            time.sleep(hold)
            conn.sendall(original_dst(conn).encode())

    serve(listener(), answer)
    print("ready", flush=True)
    while not os.path.exists(go_file):
        time.sleep(0.01)

    def client(i):
        want = "%s.%d:80" % (prefix, i % 250 + 1)
        s = socket.socket()
        s.settimeout(60)
        if port_base:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port_base + i))
        s.connect((want.split(":")[0], 80))
        s.sendall(b"x")
        got = recv_until_closed(s).decode()
        s.close()
        return None if got == want else "wrong: connection %d to %s was told %s" % (i, want, got)

    with ThreadPoolExecutor(concurrency) as pool:
        wrong = [w for w in pool.map(client, range(count)) if w]
    for line in wrong:
        print(line, flush=True)
    print("ok %d" % count if not wrong else "failed", flush=True)
    sys.exit(1 if wrong else 0)


def holder():
    def hold(conn, peer):
        print("held %d %s" % (peer[1], original_dst(conn)), flush=True)
        recv_until_closed(conn)
        conn.close()

    serve(listener(), hold)
    print("ready", flush=True)
    threading.Event().wait()


def probe(client_port):
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    udp.bind(("127.0.0.1", 15001))
    udp.connect(("127.0.0.1", client_port))
    print("udp-on-proxy-tuple", original_dst(udp))
    own = socket.socket()
    own.bind(("127.0.0.1", 0))
    own.listen(1)
    client = socket.create_connection(own.getsockname())
    accepted, _ = own.accept()
    print("tcp-accepted", original_dst(accepted))
    print("tcp-client", original_dst(client))
    to_proxy = socket.create_connection(("127.0.0.1", 15001))
    print("tcp-to-proxy", original_dst(to_proxy))


def fastopen_proxy():
    def answer(conn, peer):
        conn.recv(100)
        line = "%d %s" % (peer[1], original_dst(conn))
        print(line, flush=True)
        conn.sendall(line.encode())
        conn.close()

    serve(listener(fastopen=True), answer)
    print("ready", flush=True)
    threading.Event().wait()


def fastopen_clients(dest, count):
    for _ in range(count):
        s = socket.socket()
        s.settimeout(10)
        s.sendto(b"request in the SYN", MSG_FASTOPEN, (dest, 80))
        print(recv_until_closed(s).decode(), flush=True)
        s.close()


def connect_from(client_port):
    s = socket.socket()
    s.settimeout(10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", client_port))
    s.connect(("127.0.0.1", 15001))
    s.sendall(b"direct")
    print(recv_until_closed(s).decode(), flush=True)


mode, args = sys.argv[1], sys.argv[2:]
if mode == "sidecar":
    sidecar(args[0], int(args[1]), int(args[2]), int(args[3]), float(args[4]), args[5])
elif mode == "holder":
    holder()
elif mode == "probe":
    probe(int(args[0]))
elif mode == "fastopen-proxy":
    fastopen_proxy()
elif mode == "fastopen-clients":
    fastopen_clients(args[0], int(args[1]))
elif mode == "connect-from":
    connect_from(int(args[0]))
else:
    sys.exit("unknown mode " + mode)
