"""The op builds where CUDA does not: on a machine without a CUDA toolkit (setup.py's CPU-only branch), and off
x86-64: an aarch64 build (Grace Hopper nodes, Arm servers) through the clang that the ziglang package carries, against
this torch's headers. The aarch64 build leaves csrc/proto_dgeo.cpp out: it needs the target's own Python headers,
and holds only the schemas and the module's C API glue."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
import torch.utils.cpp_extension

from helpers import make_case, weighted_grad
import ngd_ext

ROOT = pathlib.Path(__file__).resolve().parent.parent
EM_AARCH64 = 183  # ELF e_machine of an aarch64 object


@pytest.mark.parametrize("source", ["csrc/checks.cpp", "csrc/cpu/proto_dgeo_cpu.cpp"])
def test_compiles_for_aarch64(source, tmp_path):
    pytest.importorskip("ziglang", reason="the aarch64 compiler comes with ziglang (requirements-dev.txt)")
    includes = [arg for path in torch.utils.cpp_extension.include_paths() for arg in ("-isystem", path)]
    obj = tmp_path / "out.o"
    result = subprocess.run(
        [sys.executable, "-m", "ziglang", "c++", "-target", "aarch64-linux-gnu", "-std=c++20", "-O2", "-Wall",
         "-Werror", *includes, "-c", str(ROOT / source), "-o", str(obj)],
        capture_output=True, text=True, env=dict(os.environ, ZIG_GLOBAL_CACHE_DIR=str(tmp_path / "zig-cache")))
    assert result.returncode == 0, result.stderr[-4000:]
    header = obj.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == EM_AARCH64


@pytest.mark.skipif(not ngd_ext.fused_available("cpu"), reason="ngd_ext._C is not built")
def test_cpu_only_build(tmp_path):
    """NGD_NO_CUDA=1 builds as a machine without nvcc would: the CPU kernels alone, which give this build's bits."""
    copy = tmp_path / "project"
    shutil.copytree(ROOT / "csrc", copy / "csrc")
    shutil.copytree(ROOT / "ngd_ext", copy / "ngd_ext", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(ROOT / "setup.py", copy)
    shutil.copy(ROOT / "tests" / "helpers.py", copy)
    # cpp_extension finds ninja on PATH; the venv's bin folder is not on it when the venv is not activated.
    env = dict(os.environ, NGD_NO_CUDA="1", MAX_JOBS="2",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "--build-temp", str(tmp_path / "b")],
                           cwd=copy, env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]

    script = (
        "import pathlib, torch, ngd_ext\n"
        "from helpers import make_case, weighted_grad\n"
        "print(pathlib.Path(ngd_ext._C.__file__).parent == pathlib.Path('ngd_ext').resolve())\n"
        "print(ngd_ext.fused_available('cpu'), ngd_ext.fused_available('cuda'))\n"
        "torch.save(weighted_grad(ngd_ext.proto_dgeo_loss, make_case(300, 64, 25, 8, seed=3)), 'result.pt')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=copy, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines()[:2] == ["True", "True False"]
    got = torch.load(copy / "result.pt", weights_only=True)
    torch.testing.assert_close(got, weighted_grad(ngd_ext.proto_dgeo_loss, make_case(300, 64, 25, 8, seed=3)),
                               rtol=0, atol=0)
