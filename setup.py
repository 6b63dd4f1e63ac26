"""Builds ngd_ext._C: the fused Proto-KD + D-Geo op, CPU always, CUDA wherever nvcc is found (the project's metadata
is in pyproject.toml).

The CUDA kernel is compiled whenever a CUDA toolkit is present, GPU or not, so that a machine without a GPU
still catches CUDA compile errors. NGD_NO_CUDA=1 skips it; FORCE_CUDA=1 makes a missing toolkit an error.
Where unset, CUDA_HOME becomes the toolkit's root and TORCH_CUDA_ARCH_LIST the GPUs present (9.0 with none).
"""

import glob
import os
import shutil

import torch
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def toolkit_root():
    """CUDA_HOME, or the first CUDA toolkit root found: one holding bin/nvcc and include/cuda_runtime.h. The nvcc on
    PATH may be a wrapper script outside the root, from which torch would guess the wrong folder (-lcudart fails)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    candidates = ["/usr/local/cuda", "/opt/cuda"] + ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
                                                     if nvcc else [])
    return next((root for root in candidates if os.access(os.path.join(root, "bin", "nvcc"), os.X_OK)
                 and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))), None)


def want_cuda() -> bool:
    """Whether to build the CUDA kernel; where so, CUDA_HOME and TORCH_CUDA_ARCH_LIST are set for torch's build."""
    if os.environ.get("NGD_NO_CUDA") == "1":
        return False
    root = toolkit_root()
    if os.environ.get("FORCE_CUDA") == "1" and not root:
        raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the toolkit's root")
    if root and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # the GPUs present, so that the kernels run on them; with none, Hopper alone, to compile and check the CUDA
        # code in about a minute (unset, torch 2.14 stops with an IndexError where no GPU is visible)
        capabilities = {"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(sorted(capabilities)) or "9.0"
    if root:
        os.environ["CUDA_HOME"] = root
    return root is not None


def extension():
    cuda = want_cuda()  # before torch's build module is imported: it reads CUDA_HOME once, at import
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))]
    sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    # OpenMP in both compile and link flags, or at::parallel_for runs on one thread; fused multiply-adds in
    # the AVX2 kernels (ISO C++ modes turn contraction off).
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=fast"]
    link_flags = ["-fopenmp"]
    if cuda:
        sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]
        return CUDAExtension(
            "ngd_ext._C",
            sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link_flags,
        )
    return CppExtension("ngd_ext._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)


ext_modules = [extension()]
from torch.utils.cpp_extension import BuildExtension  # noqa: E402 (after extension() has set CUDA_HOME)

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
