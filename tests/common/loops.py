# Request loops that count failures, for the hand-over tests and benchmarks.
#
#   http HOST PORT INTERVAL_MS STOP_FILE
#       a new TCP connection and one HTTP GET of / every INTERVAL_MS until
#       STOP_FILE exists; a request fails when it is refused, reset, times
#       out (1 s) or gets anything but a 200.
#   udp HOST PORT INTERVAL_MS STOP_FILE
#       one datagram on one connected UDP socket every INTERVAL_MS, each
#       sent back by an echo server; a request fails when its echo does not
#       come within 1 s.
#
# Prints "started" after the first success, then at the end
# "ok N failed M longest_ms L": L is the longest time between the starts
# of two requests that both succeeded with only failures between them, a
# client's view of a stall.
import os
import socket
import sys
import time


def http_once(host, port):
    with socket.create_connection((host, port), timeout=1) as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        reply = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply.startswith(b"HTTP/1.0 200") or reply.startswith(b"HTTP/1.1 200")


def udp_sender(host, port):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, port))
    s.settimeout(1)
    counter = [0]

    def once(_host, _port):
        counter[0] += 1
        message = b"m%d" % counter[0]
        s.send(message)
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            try:
                if s.recv(65536) == message:
                    return True
            except socket.timeout:
                return False
        return False

    return once


def main():
    kind, host, port, interval_ms, stop = sys.argv[1:6]
    port, interval = int(port), int(interval_ms) / 1000
    once = http_once if kind == "http" else udp_sender(host, port)
    ok = failed = 0
    last_ok = None
    longest = 0.0
    started = False
    while not os.path.exists(stop):
        begun = time.monotonic()
        try:
            success = once(host, port)
        except OSError:
            success = False
        if success:
            ok += 1
            if last_ok is not None:
                longest = max(longest, begun - last_ok)
            last_ok = begun
            if not started:
                print("started", flush=True)
                started = True
        else:
            failed += 1
        time.sleep(max(0.0, interval - (time.monotonic() - begun)))
    print("ok %d failed %d longest_ms %.1f" % (ok, failed, longest * 1000), flush=True)


main()
