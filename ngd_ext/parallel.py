"""Work spread over the CPUs: pools of threads (stage 4's image decoding) and of processes (stage 1's EEG)."""

import collections
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

from tqdm import tqdm


def default_workers():
    """The CPUs this process may run on (a job scheduler's or taskset's share, not the whole machine), at most 8."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, usable)


def map_in_threads(function, items, desc, workers=None):
    """[function(item) for item in items] on a pool of threads, for work that releases the GIL (image decoding, face
    detection), in order, with a progress bar; the first exception stops the rest."""
    pool = ThreadPoolExecutor(workers or default_workers())
    try:
        return list(tqdm(pool.map(function, items), total=len(items), desc=desc, unit="image", leave=False))
    finally:
        pool.shutdown(cancel_futures=True)


def map_in_processes(function, items, workers):
    """function(item) for every item, in order, lazily: in this process with one worker, else in `workers` processes
    with at most two items each under way, so that a lazy `items` is read only as fast as the workers take it.
    function and the items must pickle."""
    if workers == 1:
        yield from map(function, items)
        return
    # spawn: the parent may hold threads (tqdm's monitor, OpenMP's pool) that a forked child would inherit locked.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        under_way = collections.deque()
        for item in items:
            under_way.append(pool.submit(function, item))
            if len(under_way) == 2 * workers:
                yield under_way.popleft().result()
        while under_way:
            yield under_way.popleft().result()
