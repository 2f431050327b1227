"""What the tests observe of the process: resident memory, live tensors, hangs, threads."""

import contextlib
import gc
import os
import signal
import threading

import torch


def rss_bytes():
    """Resident set size of this process, from /proc (no psutil here)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensors():
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


@contextlib.contextmanager
def hang_guard(seconds=60):
    """Turns a hang into a failure (not a timing assert: the limit is minutes away from
    what any guarded call takes)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def in_threads(fn, count):
    """Runs fn(i) in `count` threads started together; returns the results in order and
    re-raises the first exception."""
    barrier = threading.Barrier(count)
    results, errors = [None] * count, []

    def worker(i):
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
