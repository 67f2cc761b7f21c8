"""Build script: the Python package plus optional compiled kernels.

Metadata lives in pyproject.toml. Extensions:
* ``fair_pruner._C``: C++/OpenMP CPU kernels from ``csrc/cpu/*.cpp`` (built when sources exist).
* ``fair_pruner._cuda``: CUDA kernels from ``csrc/cuda/*`` (built only with a CUDA torch and
  nvcc, or when FAIR_PRUNER_BUILD_CUDA=1; FAIR_PRUNER_BUILD_CUDA=0 disables it).
Set FAIR_PRUNER_NO_EXT=1 to skip every extension (the package then runs on its PyTorch paths).
Triton kernels ship as the ``fair_pruner.kernels`` package (from ``kernels/``).
"""
import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("FAIR_PRUNER_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], {}
    exts = []
    cpu_src = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if cpu_src:
        exts.append(CppExtension(
            "fair_pruner._C", cpu_src,
            extra_compile_args=["-O3", "-g0", "-fopenmp"], extra_link_args=["-fopenmp"]))
    cuda_src = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) +
                      glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    want = os.environ.get("FAIR_PRUNER_BUILD_CUDA")
    from torch.utils.cpp_extension import CUDA_HOME
    can = torch.version.cuda is not None and CUDA_HOME is not None
    if cuda_src and (want == "1" or (want != "0" and can and torch.cuda.is_available())):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        exts.append(CUDAExtension(
            "fair_pruner._cuda", cuda_src,
            extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": ["-O3", "-std=c++17"]}))
    return exts, ({"build_ext": BuildExtension.with_options(use_ninja=True)} if exts else {})


ext_modules, cmdclass = _extensions()

setup(
    packages=["fair_pruner", "fair_pruner.llm", "fair_pruner.kernels"],
    package_dir={"fair_pruner": "fair_pruner", "fair_pruner.kernels": "kernels"},
    # The demo's trained CNN (fair_pruner/demo.py; rebuilt by `fair-pruner demo --train
    # --save-model fair_pruner/demo_cnn.safetensors`).
    package_data={"fair_pruner": ["demo_cnn.safetensors"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
