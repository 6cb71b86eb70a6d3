"""A loopback pool: a server on 127.0.0.1:PORT and N client connections. With `stall`, the
server reads each request and never answers. Prints `ready` once the requests are sent."""
import socket, sys, threading, time
port, n, stall = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "stall"
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port)); srv.listen()
def serve(conn):
    while True:
        data = conn.recv(100)
        if not data: return
        if not stall: conn.sendall(b"ok")
def accept():
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
threading.Thread(target=accept, daemon=True).start()
pool = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
time.sleep(0.05)
for conn in pool:
    conn.sendall(b"SELECT 1")
    if not stall: conn.recv(10)
print("ready", flush=True)
sys.stdin.read()
