# recv() for the tests' Python helpers, prepended to each (concat! in the
# tests, which run them with `python3 -c`).
import select


def recv(sock, size):
    # A blocking recv on a socket in a sockmap may fail with EAGAIN (seen on
    # 6.18): wait for data and read again.
    while True:
        try:
            return sock.recv(size)
        except BlockingIOError:
            select.select([sock], [], [], 1)
