"""The op's C++ compiles off x86-64 too: an aarch64 build (Grace Hopper nodes, Arm servers) through the clang that
the ziglang package carries, against this torch's headers. csrc/proto_dgeo.cpp is left out: it needs the
target's own Python headers, and holds only the schemas and the module's C API glue."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch.utils.cpp_extension

ROOT = pathlib.Path(__file__).resolve().parent.parent
EM_AARCH64 = 183  # ELF e_machine of an aarch64 object


@pytest.mark.parametrize("source", ["csrc/checks.cpp", "csrc/cpu/proto_dgeo_cpu.cpp"])
def test_compiles_for_aarch64(source, tmp_path):
    includes = [arg for path in torch.utils.cpp_extension.include_paths() for arg in ("-isystem", path)]
    obj = tmp_path / "out.o"
    result = subprocess.run(
        [sys.executable, "-m", "ziglang", "c++", "-target", "aarch64-linux-gnu", "-std=c++20", "-O2", "-Wall",
         "-Werror", *includes, "-c", str(ROOT / source), "-o", str(obj)],
        capture_output=True, text=True, env=dict(os.environ, ZIG_GLOBAL_CACHE_DIR=str(tmp_path / "zig-cache")))
    assert result.returncode == 0, result.stderr[-4000:]
    header = obj.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == EM_AARCH64
