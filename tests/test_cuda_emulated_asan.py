"""The emulated CUDA kernels under AddressSanitizer: test_cuda_emulated.py run again, under one schedule, with the
emulator built with AddressSanitizer, in a process of its own (a file of its own, so that a parallel test run can
start it beside the rest)."""

import pathlib

from helpers import run_under_address_sanitizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
EMULATED_TESTS = str(ROOT / "tests" / "test_cuda_emulated.py")
ASAN_SELECTION = "not in_order and not reversed"  # the tests of every schedule but those two, which run unsanitized


def test_kernels_pass_under_address_sanitizer():
    """A GPU faults on an access outside every allocation (compute-sanitizer's memcheck names it), where the
    emulator on a CPU reads whatever the heap holds there, and a result that ignores what it read shows nothing:
    test_cuda_emulated.py runs again, under one schedule, with the emulator built with AddressSanitizer, which stops at
    the first access outside an allocation, a tensor's included, and names it."""
    # -s: the sanitizer's report goes to stderr as the process ends, which pytest's capture would swallow.
    run_under_address_sanitizer(["-m", "pytest", "-v", "-s", "-p", "no:cacheprovider", EMULATED_TESTS, "-k",
                                 ASAN_SELECTION], {"NGD_EMULATOR_ASAN": "1"}, ROOT)
