"""A SQLAlchemy QueuePool (psycopg2) whose every connection blocks on a row lock.

Usage: queuepool.py PORT SIZE. Warms SIZE pooled connections, starts SIZE transactions
that each UPDATE the locked row (psycopg2 sends BEGIN, reads its answer, then sends the
UPDATE: the two can share a kernel tick), then checks out one more connection, which
times out. Prints `ready`, then the checkout's error, then waits for stdin to close.
"""
import sys
import threading
import time

from sqlalchemy import create_engine, text

port, size = int(sys.argv[1]), int(sys.argv[2])
engine = create_engine(
    f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres",
    pool_size=size,
    max_overflow=0,
    pool_timeout=2,
)
warm = [engine.connect() for _ in range(size)]
for conn in warm:
    conn.execute(text("SELECT 1"))
for conn in warm:
    conn.close()
print("ready", flush=True)


def update():
    with engine.begin() as conn:
        conn.execute(text("UPDATE accounts SET n = n + 1 WHERE id = 1"))


threads = [threading.Thread(target=update, daemon=True) for _ in range(size)]
for thread in threads:
    thread.start()
time.sleep(0.5)
try:
    engine.connect()
    print("checkout succeeded", flush=True)
except Exception as err:  # sqlalchemy.exc.TimeoutError
    print(str(err).splitlines()[0], flush=True)
sys.stdin.read()
