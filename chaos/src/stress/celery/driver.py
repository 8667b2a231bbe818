"""drover-chaos Celery baseline: the load driver, the same closed/open loop as the Rust one.

argv: task mode(closed|open) concurrency rate runs duration_s
Prints one JSON line per finished task: {"t": s since start, "submit_ms", "e2e_ms", "err"},
then {"elapsed": s}. In open loop, e2e counts from the scheduled start.
"""
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import tasks

task_name, mode, conc, rate, runs, duration = sys.argv[1:7]
conc, rate, runs, duration = int(conc), float(rate), int(runs), float(duration)
task = {"noop": tasks.noop, "docker": tasks.docker}[task_name]

# Wait for a worker to answer before timing anything.
deadline = time.monotonic() + 120
while not tasks.app.control.ping(timeout=1.0):
    if time.monotonic() > deadline:
        print(json.dumps({"fatal": "no celery worker answered within 120 s"}), flush=True)
        sys.exit(2)

# Warm-up, unrecorded: one task per client thread, so every thread's broker and backend
# connections exist before timing starts (drover's client gets the same courtesy).
warm = [threading.Thread(target=lambda: task.delay().get(timeout=600)) for _ in range(conc)]
for t in warm:
    t.start()
for t in warm:
    t.join()

lock = threading.Lock()
start = time.monotonic()


def emit(obj):
    with lock:
        print(json.dumps(obj), flush=True)


def one(scheduled):
    t0 = time.monotonic()
    try:
        r = task.delay()
        t1 = time.monotonic()
        code = r.get(timeout=600, propagate=True)
        r.forget()
        done = time.monotonic()
        err = None if code == 0 else "exit_%s" % code
        emit({"t": done - start, "submit_ms": (t1 - t0) * 1e3,
              "e2e_ms": (done - scheduled) * 1e3, "err": err})
    except Exception as e:  # noqa: BLE001 - every failure is a counted error
        emit({"t": time.monotonic() - start, "err": type(e).__name__})


def more(started, at):
    return started < runs if runs > 0 else at - start < duration


if mode == "closed":
    counter = [0]

    def loop():
        while True:
            with lock:
                if not more(counter[0], time.monotonic()):
                    return
                counter[0] += 1
            one(time.monotonic())

    threads = [threading.Thread(target=loop) for _ in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
else:
    period = 1.0 / rate
    started = 0
    with ThreadPoolExecutor(max_workers=max(conc, 256)) as pool:
        nxt = start
        while more(started, nxt):
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, nxt)
            started += 1
            nxt += period
emit({"elapsed": time.monotonic() - start})
