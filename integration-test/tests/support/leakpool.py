"""A SQLAlchemy QueuePool (psycopg2, size 5, overflow 5) under a steady load, in one mode.

Usage: leakpool.py MODE PORT. Prints `ready PID` once the engine exists, then per mode:
- leak: a request every 2 s checks out a connection, runs a query and never returns it
  (a session never closed). Prints `limit <epoch s> <error>` at the first checkout that
  fails with "QueuePool limit ... reached", and keeps trying.
- correct: the same load, each connection returned after its query.
- burst: load grows (8 workers started 0.5 s apart, each checking out, querying for 0.2 s
  and returning, for 8 s), then the pool idles: each connection reused.
- minidle: 5 connections opened together at start (a minimum-idle pool), then idle.
- pinged: connections opened as `leak` opens them, and a thread runs SELECT 1 on each
  every second (a pool that keeps its idle connections alive).
- shortlived: NullPool: every request opens, queries and closes, twice a second.
Then `done` once the load is over, and waits for stdin to close.
"""
import os
import sys
import threading
import time

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

mode, port = sys.argv[1], int(sys.argv[2])
url = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
if mode == "shortlived":
    engine = create_engine(url, poolclass=NullPool)
else:
    engine = create_engine(url, pool_size=5, max_overflow=5, pool_timeout=2)
print(f"ready {os.getpid()}", flush=True)

INTERVAL = 2.0
REQUESTS = 14
held = []
lock = threading.Lock()


def pinger():
    while True:
        time.sleep(1)
        with lock:
            for conn in held:
                conn.execute(text("SELECT 1"))


def steady(keep):
    """REQUESTS requests INTERVAL apart; `keep`: never return the connection."""
    limited = False
    for _ in range(REQUESTS):
        started = time.time()
        try:
            conn = engine.connect()
            conn.execute(text("SELECT 1"))
            if keep:
                with lock:
                    held.append(conn)
            else:
                conn.close()
        except Exception as err:  # sqlalchemy.exc.TimeoutError
            if not limited:
                print(f"limit {time.time():.3f} {str(err).splitlines()[0]}", flush=True)
                limited = True
        time.sleep(max(0.0, INTERVAL - (time.time() - started)))


def worker(until):
    while time.time() < until:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_sleep(0.2)"))


if mode == "leak":
    steady(keep=True)
elif mode == "correct":
    steady(keep=False)
elif mode == "pinged":
    threading.Thread(target=pinger, daemon=True).start()
    steady(keep=True)
elif mode == "burst":
    until = time.time() + 8
    workers = []
    for _ in range(8):
        workers.append(threading.Thread(target=worker, args=(until,)))
        workers[-1].start()
        time.sleep(0.5)
    for thread in workers:
        thread.join()
elif mode == "minidle":
    conns = [engine.connect() for _ in range(5)]
    for conn in conns:
        conn.execute(text("SELECT 1"))
    for conn in conns:
        conn.close()
elif mode == "shortlived":
    for _ in range(2 * REQUESTS):
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        time.sleep(INTERVAL / 4)
print("done", flush=True)
sys.stdin.read()
