# The two ends of TCP connections between two pods (two processes, in two
# network namespaces), every byte checked.
#
#   server HOST PORT [LINGER_MS] [READ_BYTES] [PAUSE_MS]
#       an echo server: each connection is echoed until its client
#       half-closes; then the server waits LINGER_MS (in CLOSE_WAIT) before
#       it closes. It reads READ_BYTES at a time (64 KiB), PAUSE_MS apart:
#       a reader slower than its writer. Prints "listening" when ready.
#   client HOST PORT SIZE TAG [BIND_IP:BIND_PORT] [PACE_MS] [DELAY_MS]
#       waits DELAY_MS once connected, then
#       sends SIZE bytes made from TAG in 64 KiB writes (PACE_MS apart),
#       reads the echo meanwhile, and checks that it is exactly what it
#       sent: a byte of another connection (another TAG) would show.
#       Binds to BIND first when given (two pairs of pods with one 4-tuple).
#       Prints "ok SIZE", or the first difference and exits 1.
#   order-server HOST PORT
#       for each connection: reads a little, waits, reads the rest, and
#       checks that the numbered stream came in order. Prints "listening",
#       then "bad N" for each connection out of order.
#   order-client HOST PORT CONNECTIONS
#       that many connections, each writing a numbered stream (4-byte
#       counters, writes of 1 to 4096 bytes) from the moment connect()
#       starts, in three parts 20 ms apart. Prints "ok" once all are
#       written.
import random
import select
import socket
import sys
import threading
import time

CHUNK = 64 * 1024

# recv(): tests/common/sockmap_recv.py, prepended.


def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def serve(host, port, linger_ms, read_bytes, pause_ms):
    listener = socket.socket(family(host))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(64)

    def echo(conn):
        while True:
            data = recv(conn, read_bytes)
            if not data:
                break
            conn.sendall(data)
            if pause_ms:
                time.sleep(pause_ms / 1000)
        time.sleep(linger_ms / 1000)
        conn.close()

    print("listening", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def client(host, port, size, tag, bind, pace_ms, delay_ms):
    data = random.Random(tag).randbytes(size)
    sock = socket.socket(family(host))
    if bind:
        ip, bind_port = bind.rsplit(":", 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip.strip("[]"), int(bind_port)))
    sock.connect((host, port))
    time.sleep(delay_ms / 1000)
    received = bytearray()

    def read():
        while True:
            part = recv(sock, 1 << 20)
            if not part:
                return
            received.extend(part)

    reader = threading.Thread(target=read)
    reader.start()
    for offset in range(0, size, CHUNK):
        sock.sendall(data[offset : offset + CHUNK])
        if pace_ms:
            time.sleep(pace_ms / 1000)
    sock.shutdown(socket.SHUT_WR)
    reader.join()
    sock.close()
    if bytes(received) != data:
        first = next((i for i, (a, b) in enumerate(zip(received, data)) if a != b), len(received))
        print("tag %s: %d bytes back of %d, first difference at %d" % (tag, len(received), size, first), flush=True)
        sys.exit(1)
    print("ok %d" % size, flush=True)


STREAM = b"".join(k.to_bytes(4, "big") for k in range(8192))
SIZES = [1, 3, 7, 64, 500, 1400, 4096]


def order_server(host, port):
    listener = socket.socket(family(host))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(1024)

    def check(conn, number):
        got = bytearray(recv(conn, 1000))
        time.sleep(0.03)
        while True:
            part = recv(conn, 1 << 16)
            if not part:
                break
            got.extend(part)
        conn.close()
        if bytes(got) != STREAM:
            print("bad %d: %d bytes" % (number, len(got)), flush=True)

    print("listening", flush=True)
    number = 0
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=check, args=(conn, number), daemon=True).start()
        number += 1


def order_client(host, port, connections):
    def one(i):
        c = socket.socket(family(host))
        c.setblocking(False)
        try:
            c.connect((host, port))
        except BlockingIOError:
            pass
        off, n = 0, i
        for end in (len(STREAM) // 4, len(STREAM) // 2, len(STREAM)):
            while off < end:
                try:
                    off += c.send(STREAM[off : min(end, off + SIZES[n % len(SIZES)])])
                    n += 1
                except (BlockingIOError, OSError):
                    select.select([], [c], [], 0.01)
            time.sleep(0.02)
        c.setblocking(True)
        c.shutdown(socket.SHUT_WR)
        recv(c, 1)
        c.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("ok", flush=True)


if sys.argv[1] == "order-server":
    order_server(sys.argv[2], int(sys.argv[3]))
elif sys.argv[1] == "order-client":
    order_client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
elif sys.argv[1] == "server":
    numbers = [int(a) for a in sys.argv[4:]] + [0, CHUNK, 0][len(sys.argv) - 4 :]
    serve(sys.argv[2], int(sys.argv[3]), *numbers[:3])
else:
    bind = sys.argv[6] if len(sys.argv) > 6 and sys.argv[6] else None
    pace = int(sys.argv[7]) if len(sys.argv) > 7 else 0
    delay = int(sys.argv[8]) if len(sys.argv) > 8 else 0
    client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], bind, pace, delay)
