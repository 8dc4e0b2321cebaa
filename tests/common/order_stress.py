# Connections whose reader falls behind, then catches up: each writes a
# numbered byte stream (4-byte big-endian counters, in writes of 1 to 4096
# bytes) in three parts, the first from the moment connect() starts
# (possibly while sockops is still inserting the socket):
#
#   1. the client writes part 1; the server reads only some of it;
#   2. the client writes part 2 while the rest of part 1 still waits in the
#      server's TCP queue (redirecting it would overtake that rest); the
#      server then reads everything so far;
#   3. the client writes part 3 (now it may take the bypass), half-closes;
#      the server reads to the end and checks the whole stream in order.
#
#   order_stress.py CONNECTIONS
#
# Prints "ok", or how many connections came out of order (exit 1).
import socket
import struct
import sys
import threading

CONNS = int(sys.argv[1])
STREAM = b"".join(struct.pack(">I", k) for k in range(4096))
PART1, PART2 = 3000, 9000
SIZES = [1, 3, 7, 64, 500, 1400, 4096]

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(4096)
port = listener.getsockname()[1]
lock = threading.Lock()
bad = []


def write(sock, data, n):
    off = 0
    while off < len(data):
        try:
            off += sock.send(data[off : off + SIZES[n % len(SIZES)]])
            n += 1
        except BlockingIOError:
            pass


def read(sock, size):
    got = b""
    while len(got) < size:
        data = sock.recv(size - len(got))
        if not data:
            break
        got += data
    return got


def connection(i):
    client = socket.socket()
    client.setblocking(False)
    with lock:
        try:
            client.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        server, _ = listener.accept()
    write(client, STREAM[:PART1], i)
    got = server.recv(1 + i % (PART1 - 1))
    write(client, STREAM[PART1:PART2], i)
    got += read(server, PART2 - len(got))
    write(client, STREAM[PART2:], i)
    client.shutdown(socket.SHUT_WR)
    got += read(server, len(STREAM))
    if got != STREAM:
        at = next(k for k in range(0, len(got), 4) if got[k : k + 4] != STREAM[k : k + 4])
        bad.append(f"connection {i}: {len(got)} bytes, out of order at byte {at}")
    client.close()
    server.close()


def worker(first):
    for i in range(first, CONNS, 4):
        connection(i)


threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
if bad:
    print(f"{len(bad)} of {CONNS} connections out of order", *bad[:3], sep="\n")
    sys.exit(1)
print("ok")
