"""Build script: the pure-Python package plus an optional C++ extension ``samsvae._C``.

``SAMSVAE_BUILD_EXT``:
  * ``0``    never build the extension (pure Python, reference backend only);
  * ``1``    build it and fail the install when the build fails (CI);
  * unset    build it when torch and a C++ compiler are present; on failure install pure
             Python and say so.  ``Extension(optional=True)`` is not enough for this: a failing
             ninja build raises ``RuntimeError`` from torch's ``BuildExtension``, so the guard
             below catches it explicitly.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

MODE = os.environ.get("SAMSVAE_BUILD_EXT", "auto").strip().lower()
if MODE not in {"0", "1", "auto", ""}:
    sys.exit(f"SAMSVAE_BUILD_EXT must be 0, 1 or unset, got {MODE!r}")


def _say(msg):
    print(f"[samsvae setup] {msg}", file=sys.stderr, flush=True)


def _extension_config():
    if MODE == "0":
        _say("SAMSVAE_BUILD_EXT=0: skipping the C++ extension (reference backend only)")
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    problems = []
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        problems.append("torch is not importable in the build environment "
                        "(install torch first and use pip install --no-build-isolation)")
    if not sources:
        problems.append("csrc/ holds no .cpp sources")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        problems.append(f"no C++ compiler found ({cxx!r} is not on PATH)")
    if problems:
        if MODE == "1":
            sys.exit("SAMSVAE_BUILD_EXT=1 but the C++ extension cannot be built: " + "; ".join(problems))
        _say("installing pure Python without the C++ extension: " + "; ".join(problems))
        return [], {}

    def accepts_openmp():
        # at::parallel_for is a header template: without -fopenmp in *our* compile it runs
        # serially. The extension then shares the libgomp torch already loaded (same soname).
        import subprocess
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.cpp")
            with open(src, "w") as f:
                f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
            cmd = [cxx, "-fopenmp", src, "-o", os.path.join(tmp, "probe")]
            return subprocess.run(cmd, capture_output=True).returncode == 0

    # Baseline code only: no -march=native and no -ffast-math, so the built module runs on any
    # machine of the architecture. csrc/isa/ compiles the kernels once per ISA (baseline, AVX2,
    # AVX-512) under a target pragma and picks one at runtime (csrc/common/cpu_dispatch.cpp).
    # -ffp-contract=fast only lets the compiler fuse a*b+c into one FMA (one rounding instead
    # of two); the C++ standard is left to torch's BuildExtension (C++20 for torch >= 2.10,
    # C++17 before; the sources are valid in both).
    cxx_flags = ["-O3", "-fno-math-errno", "-ffp-contract=fast", "-Wno-unused-parameter"]
    link_flags = []
    if accepts_openmp():
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    else:
        _say(f"{cxx} does not accept -fopenmp: the C++ kernels will run on one thread")
    ext = CppExtension(
        "samsvae._C",
        sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )

    class GuardedBuildExt(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler/ninja failure
                if MODE == "1":
                    raise
                _say(f"building the C++ extension failed ({type(exc).__name__}: {exc}); "
                     "installing pure Python: the reference backend will be used. "
                     "Set SAMSVAE_BUILD_EXT=1 to make this fatal.")

    return [ext], {"build_ext": GuardedBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_config()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
