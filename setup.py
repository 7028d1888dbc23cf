"""Build ldm_engine, and its CUDA extension ``ldm_engine._C`` when a CUDA toolkit is found.

The CUDA kernels take device pointers, shapes and a stream, so ``_C`` links only the CUDA
runtime (statically) and pybind11 -- not PyTorch's C++ library: one build serves any torch.

Environment:
  LDM_ENGINE_CUDA=0            build without ``_C`` (everything falls back to PyTorch / Triton)
  LDM_ENGINE_CUDA_ARCHS="80;90" compute capabilities to compile for (default 80;86;89;90); PTX of the
                               highest is embedded too (newer GPUs JIT it)
  CUDA_HOME                    toolkit location (default: the directory holding ``nvcc``)
  LDM_ENGINE_NVCC_THREADS      nvcc --threads (default 2)
"""

import glob
import os
import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80;86;89;90"


def find_cuda_home():
    """The toolkit root: the directory holding include/cuda_runtime.h and bin/nvcc."""
    if os.environ.get("LDM_ENGINE_CUDA", "1") == "0":
        return None
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:  # nvcc may be a wrapper script on PATH; try its real location first
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in filter(None, candidates):
        home = Path(home)
        if (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists():
            return home
    return None


def gencode_flags(archs):
    """SASS for each listed architecture, plus PTX of the highest one, so that newer GPUs (sm_100,
    sm_120, ...) JIT-compile the kernels at load time instead of failing with "no kernel image is
    available". The default list ends with 90: compute_90 PTX is embedded."""
    flags = []
    listed = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
    for arch in listed:
        # sm_90a unlocks Hopper-only instructions (wgmma, TMA) where kernels use them.
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    if listed:
        top = max(listed, key=lambda a: int("".join(ch for ch in a if ch.isdigit()) or 0))
        flags += ["-gencode", f"arch=compute_{top},code=compute_{top}"]
    return flags


class BuildExtWithNvcc(build_ext):
    """Compile ``.cu`` sources with nvcc ourselves, then link with the C++ compiler.

    torch.utils.cpp_extension refuses ``.cu`` files under a CPU build of torch, and we do not
    link torch anyway, so the build drives nvcc directly.
    """

    def build_extension(self, ext):
        cuda_home = Path(ext.cuda_home)
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        archs = os.environ.get("LDM_ENGINE_CUDA_ARCHS", DEFAULT_ARCHS)
        obj_dir = Path(self.build_temp) / "cuda"
        obj_dir.mkdir(parents=True, exist_ok=True)
        objects = []
        for src in cu_sources:
            obj = obj_dir / (Path(src).stem + ".o")
            cmd = [
                str(cuda_home / "bin" / "nvcc"), "-c", src, "-o", str(obj),
                "-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                "-Xcompiler", "-fPIC", "-I", str(ROOT / "csrc"),
                "--threads", os.environ.get("LDM_ENGINE_NVCC_THREADS", "2"),
                *gencode_flags(archs),
            ]
            print("nvcc:", " ".join(cmd), flush=True)
            subprocess.check_call(cmd)
            objects.append(str(obj))
        ext.extra_objects = list(ext.extra_objects or []) + objects
        ext.define_macros = list(ext.define_macros or []) + [
            ("LDM_ENGINE_CUDA_ARCHS", f'"{archs}"'),
        ]
        super().build_extension(ext)


def cuda_extension():
    cuda_home = find_cuda_home()
    if cuda_home is None:
        print("ldm_engine: no CUDA toolkit (or LDM_ENGINE_CUDA=0): building without ldm_engine._C")
        return None
    import pybind11

    lib_dirs = [d for d in (cuda_home / "lib64", cuda_home / "lib", cuda_home / "targets/x86_64-linux/lib",
                            cuda_home / "targets/sbsa-linux/lib") if d.exists()]
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    ext = Extension(
        "ldm_engine._C",
        sources=sources,
        include_dirs=[pybind11.get_include(), str(cuda_home / "include"), str(ROOT / "csrc")],
        library_dirs=[str(d) for d in lib_dirs],
        # Static CUDA runtime: the module imports on machines without libcudart, and on
        # machines without a driver it loads and reports that no device is present.
        libraries=["cudart_static", "dl", "rt", "pthread"],
        extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden"],
        language="c++",
    )
    ext.cuda_home = str(cuda_home)
    return ext


ext = cuda_extension()

setup(
    packages=find_packages(include=["ldm_engine", "ldm_engine.*"])
    + ["ldm_engine.kernels", "ldm_engine.export"],
    package_dir={
        "ldm_engine": "ldm_engine",
        "ldm_engine.kernels": "kernels",
        "ldm_engine.export": "export",
    },
    package_data={"ldm_engine": ["data/**/*", "configs/**/*"]},
    include_package_data=True,
    ext_modules=[ext] if ext else [],
    cmdclass={"build_ext": BuildExtWithNvcc},
)
