"""Test-session settings. Under pytest-xdist (scripts/test.sh runs a worker per CPU) each worker, and every process it
starts, computes on one thread: two workers of two threads each would fight over two cores."""

import os

import pytest
import torch

import stage2_prototypes
from test_prototypes import write_stage1

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run_with_bank(tmp_path_factory):
    """A run folder with a stage-2 bank of 400 embeddings of size 32, as stage 3 reads it (once per test module)."""
    run_dir = str(tmp_path_factory.mktemp("run"))
    write_stage1(run_dir, count=400)
    stage2_prototypes.main(["--run-dir", run_dir, "--min-count", "1"])
    return run_dir


# The files that take longest, in an order that keeps pytest-xdist's two workers about equally busy: it hands each
# worker two files to begin with (the 1st and 3rd, the 2nd and 4th), then the next file to whichever finishes first; a
# long file started last would leave the other worker idle at the end.
LONGEST_FIRST = ["test_stage3_runs.py", "test_cuda_emulated_asan.py", "test_faults.py", "test_portability.py",
                 "test_training_bench.py", "test_stage4.py", "test_cuda_emulated.py", "test_stage1.py",
                 "test_stage3.py", "test_backbones.py", "test_fused.py"]


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order
