# Both ends of same-host TCP connections, in one process, checking every byte.
#
#   echo SERVER_HOST CONNECT_HOST SIZE CONNS [PACE_MS]
#       an echo server on SERVER_HOST (port 0 = any free port); CONNS clients
#       connect to CONNECT_HOST at the same port, each sends SIZE bytes (in
#       64 KiB writes, sleeping PACE_MS between them) while reading the echo,
#       then half-closes; the echo must come back byte for byte, then EOF.
#   push-close SERVER_HOST SIZE
#       the server writes SIZE bytes and closes at once; the client starts
#       reading only later and must still get every byte, then EOF.
#   half-close SERVER_HOST SIZE
#       the client sends SIZE bytes and half-closes; the server reads to EOF,
#       answers with the SHA-256 of what it read, and closes.
#
# Prints "started" once data flows and "ok <bytes>" at the end; exits 1 on
# any difference.
import hashlib
import random
import socket
import sys
import threading
import time

CHUNK = 64 * 1024


def pattern(size, seed):
    return random.Random(seed).randbytes(size)


def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def listen(host):
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if host == "::":
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((host, 0))
    s.listen(1024)
    return s


def connect(host, port):
    c = socket.socket(family(host), socket.SOCK_STREAM)
    c.settimeout(60)
    c.connect((host, port))
    return c


def recv_all(sock):
    parts = []
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return b"".join(parts)
        parts.append(data)


def serve_forever(listener, handler):
    def loop():
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


def echo_handler(conn):
    while True:
        data = conn.recv(CHUNK)
        if not data:
            break
        conn.sendall(data)
    conn.close()


started = threading.Event()


def echo_client(host, port, size, seed, pace, results):
    data = pattern(size, seed)
    c = connect(host, port)

    def writer():
        for offset in range(0, size, CHUNK):
            c.sendall(data[offset : offset + CHUNK])
            if pace:
                time.sleep(pace)
        c.shutdown(socket.SHUT_WR)

    w = threading.Thread(target=writer)
    w.start()
    received = bytearray()
    while True:
        part = c.recv(1 << 20)
        if not part:
            break
        received += part
        if len(received) >= min(size, 1 << 20):
            started.set()
    w.join()
    c.close()
    results[seed] = bytes(received) == data


def main():
    mode = sys.argv[1]
    if mode == "echo":
        server_host, connect_host = sys.argv[2], sys.argv[3]
        size, conns = int(sys.argv[4]), int(sys.argv[5])
        pace = int(sys.argv[6]) / 1000 if len(sys.argv) > 6 else 0
        listener = listen(server_host)
        port = listener.getsockname()[1]
        serve_forever(listener, echo_handler)
        results = {}
        clients = [
            threading.Thread(target=echo_client, args=(connect_host, port, size, seed, pace, results))
            for seed in range(conns)
        ]
        for t in clients:
            t.start()
        threading.Thread(target=lambda: (started.wait(), print("started", flush=True)), daemon=True).start()
        for t in clients:
            t.join()
        bad = [seed for seed, good in results.items() if not good]
        if len(results) != conns or bad:
            sys.exit("connections with differences: %s of %d" % (bad, conns))
        print("ok", size * conns, flush=True)
    elif mode == "push-close":
        server_host, size = sys.argv[2], int(sys.argv[3])
        data = pattern(size, 1)
        listener = listen(server_host)

        def push(conn):
            conn.sendall(data)
            conn.close()

        serve_forever(listener, push)
        c = connect(server_host, listener.getsockname()[1])
        time.sleep(0.5)
        received = recv_all(c)
        if received != data:
            sys.exit("push-close: %d bytes, %s" % (len(received), "differ" if len(received) == size else "short"))
        print("ok", size, flush=True)
    elif mode == "half-close":
        server_host, size = sys.argv[2], int(sys.argv[3])
        data = pattern(size, 2)
        listener = listen(server_host)

        def digest(conn):
            conn.sendall(hashlib.sha256(recv_all(conn)).digest())
            conn.close()

        serve_forever(listener, digest)
        c = connect(server_host, listener.getsockname()[1])
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        answer = recv_all(c)
        if answer != hashlib.sha256(data).digest():
            sys.exit("half-close: the server read something else")
        print("ok", size, flush=True)
    else:
        sys.exit("unknown mode " + mode)


main()
