"""ngd_ext.runtime: the pools the stages spread their work over."""

import os

from ngd_ext.runtime import default_workers, map_in_processes, map_in_threads


def test_map_in_processes_reads_items_only_as_fast_as_the_workers_take_them():
    pulled = []

    def items():
        for i in range(20):
            pulled.append(i)
            yield -i

    results = map_in_processes(abs, items(), workers=2)
    assert next(results) == 0 and len(pulled) == 4  # two under way per worker, and no more
    assert list(results) == list(range(1, 20))


def test_map_in_threads_keeps_the_order():
    assert map_in_threads(abs, list(range(0, -50, -1)), "test", workers=3) == list(range(50))


def test_default_workers_follows_the_cpus_this_process_may_run_on():
    allowed = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(allowed)})  # as `taskset -c` or a job scheduler would
        assert default_workers() == 1
    finally:
        os.sched_setaffinity(0, allowed)
    assert default_workers() == min(8, len(allowed))
