"""Actors of tests/zombie.rs, on 127.0.0.1 (stdlib only). Each prints `listening PORT` first.

  service push   writes `tick` to every client every 150 ms, reads what they send
  service echo   only answers what a client sends (its idle clients hear nothing)
  proxy PORT     a multiplexer in front of 127.0.0.1:PORT: one upstream connection per
                 client (`upstream CLIENT_PORT UPSTREAM_PORT`); when a client goes away it
                 keeps the upstream connection open, reading and discarding, never closing
"""
import selectors
import socket
import sys
import time

TICK = 0.15


def listen():
    server = socket.create_server(("127.0.0.1", 0))
    print("listening", server.getsockname()[1], flush=True)
    return server


def service(mode):
    server, selector, clients = listen(), selectors.DefaultSelector(), set()
    selector.register(server, selectors.EVENT_READ)
    next_tick = time.monotonic()
    while True:
        timeout = max(0.0, next_tick - time.monotonic()) if mode == "push" else None
        for key, _ in selector.select(timeout):
            sock = key.fileobj
            if sock is server:
                client, _ = server.accept()
                clients.add(client)
                selector.register(client, selectors.EVENT_READ)
                continue
            data = receive(sock)
            if not data:
                selector.unregister(sock)
                clients.discard(sock)
                sock.close()
            elif mode == "echo":
                sock.sendall(data)
        if mode == "push" and time.monotonic() >= next_tick:
            next_tick += TICK
            for client in list(clients):
                try:
                    client.sendall(b"tick\n")
                except OSError:
                    selector.unregister(client)
                    clients.discard(client)


def proxy(upstream_port):
    server, selector = listen(), selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    # Socket -> the one its data goes to; an upstream whose client left maps to None.
    forward = {}
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            if sock is server:
                client, address = server.accept()
                upstream = socket.create_connection(("127.0.0.1", upstream_port))
                print("upstream", address[1], upstream.getsockname()[1], flush=True)
                forward[client], forward[upstream] = upstream, client
                selector.register(client, selectors.EVENT_READ, "client")
                selector.register(upstream, selectors.EVENT_READ, "upstream")
                continue
            data, other = receive(sock), forward.get(sock)
            if data:
                if other is not None:
                    other.sendall(data)
                continue
            selector.unregister(sock)
            sock.close()
            del forward[sock]
            if key.data == "client":
                # The multiplexer's bug: the upstream connection outlives its client.
                forward[other] = None
            elif other is not None:
                selector.unregister(other)
                other.close()
                del forward[other]


def receive(sock):
    try:
        return sock.recv(65536)
    except OSError:
        return b""


if __name__ == "__main__":
    if sys.argv[1] == "service":
        service(sys.argv[2])
    else:
        proxy(int(sys.argv[2]))
