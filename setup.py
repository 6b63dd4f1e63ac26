"""Builds ngd_ext._C: the fused Proto-KD + D-Geo op, CPU always, CUDA wherever nvcc is found.

The CUDA kernel is compiled whenever a CUDA toolkit is present, GPU or not, so that a machine without a GPU
still catches CUDA compile errors. NGD_NO_CUDA=1 skips it; FORCE_CUDA=1 makes a missing toolkit an error.
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    if os.environ.get("NGD_NO_CUDA") == "1":
        return False
    found = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if os.environ.get("FORCE_CUDA") == "1" and not found:
        raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the toolkit's root")
    return found


def extension():
    sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))]
    sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    # OpenMP in both compile and link flags, or at::parallel_for runs on one thread; fused multiply-adds in
    # the AVX2 kernels (ISO C++ modes turn contraction off).
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=fast"]
    link_flags = ["-fopenmp"]
    if want_cuda():
        sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]
        return CUDAExtension(
            "ngd_ext._C",
            sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link_flags,
        )
    return CppExtension("ngd_ext._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)


setup(
    name="ngd_ext",
    version="0.1.0",
    description="NeuroGaze-Distill: the fused Proto-KD + D-Geo loss and the code the pipeline stages share",
    packages=find_packages(include=["ngd_ext", "ngd_ext.*"]),
    python_requires=">=3.10",
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
