"""TCP clients in another process (comm python3) for the integration tests.

    client.py pool PORT N        N connections; prints `ready`; holds them until stdin closes
    client.py one PORT [cued]    (with `cued`: after a line on stdin) one connection; prints its
                                 local port; holds it until stdin closes, then sends into it
                                 (a write after whatever became of it)
    client.py resets PORT N      N connections, each read until the server resets it; prints
                                 `done`; waits until stdin closes
    client.py exits-early PORT   connects, reads after 1.2 s (the server's reset), hands the
                                 socket to a child `sleep 3` and exits at once
"""
import socket
import subprocess
import sys
import time


def connect(port):
    return socket.create_connection(("127.0.0.1", port))


def pool(port, n):
    held = [connect(port) for _ in range(n)]
    print("ready", flush=True)
    sys.stdin.read()
    return held


def one(port, cued=False):
    if cued:
        sys.stdin.readline()
    s = connect(port)
    print(s.getsockname()[1], flush=True)
    sys.stdin.read()
    try:
        s.send(b"again")
    except OSError:
        pass


def resets(port, n):
    # On a slow guest the RST can beat connect() back to the client (ECONNRESET from
    # connect): connected and reset all the same.
    for _ in range(n):
        try:
            s = connect(port)
        except ConnectionResetError:
            continue
        try:
            s.recv(1)
        except ConnectionResetError:
            pass
        s.close()
    print("done", flush=True)
    sys.stdin.read()


def exits_early(port):
    s = connect(port)
    time.sleep(1.2)
    try:
        s.recv(1)
    except OSError:
        pass
    subprocess.Popen(["sleep", "3"], pass_fds=[s.fileno()])


mode, port, rest = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
if mode == "pool":
    pool(port, int(rest[0]))
elif mode == "one":
    one(port, cued=rest == ["cued"])
elif mode == "resets":
    resets(port, int(rest[0]))
elif mode == "exits-early":
    exits_early(port)
else:
    sys.exit(f"client.py: unknown mode {mode}")
