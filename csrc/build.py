"""Builds libtensor_ops.so with ninja: every C (and, where nvcc is found, CUDA) source under
csrc/ compiled in parallel into one shared library.

Used by setup.py (pip install) and the Makefile:

    python csrc/build.py --out build/lib/libtensor_ops.so [--sanitize] [--cuda auto|0|1]

INFERENCE_PIO_CUDA=0 skips the CUDA sources; INFERENCE_PIO_CUDA_ARCHS (default "90a") lists the
compute capabilities to build machine code for, separated by ";" or "," (e.g. "80;90a"). "90a" is
sm_90 plus the Hopper-only instructions (wgmma) of the prefill GEMM, csrc/cuda/gemm_sm90.cu; without
it that GEMM is left out and matmul.cu's own kernels run on Hopper too.
"""
import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

CSRC = Path(__file__).resolve().parent

C_FLAGS = [
    "-std=gnu11", "-O3", "-fPIC", "-pthread",
    # Baseline x86-64 code: SIMD variants are chosen at run time by target attributes, so the
    # library runs on any x86-64 CPU and the scalar path really is portable.
    "-fno-math-errno", "-ffp-contract=off",
    "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror=implicit-function-declaration",
]
SANITIZE_FLAGS = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                  "-fno-sanitize-recover=undefined"]


def find_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc:
        return Path(nvcc)
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").exists():
            return Path(root) / "bin" / "nvcc"
    return None


def cuda_lib_dir(nvcc):
    """The folder holding libcudart_static.a for this nvcc (which may be a symlink or a
    wrapper script, so the usual CUDA roots are searched too)."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), nvcc.resolve().parent.parent,
             "/usr/local/cuda"]
    for root in filter(None, roots):
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
            if (Path(root) / sub / "libcudart_static.a").exists():
                return Path(root) / sub
    raise SystemExit(f"build: nvcc found at {nvcc} but no libcudart_static.a in {roots} "
                     "(set CUDA_HOME, or INFERENCE_PIO_CUDA=0 to build without CUDA)")


def sources(subdirs, suffix):
    out = []
    for sub in subdirs:
        out += sorted((CSRC / sub).glob(f"*{suffix}"))
    return out


def write_ninja(build_dir, out, sanitize, nvcc):
    cflags = C_FLAGS + (SANITIZE_FLAGS if sanitize else [])
    includes = [f"-I{CSRC / 'include'}", f"-I{CSRC / 'core'}", f"-I{CSRC}"]
    c_srcs = sources(["core", "ops", "cpu"], ".c")
    if nvcc:
        c_srcs = [s for s in c_srcs if s.name != "no_cuda.c"]
    cu_srcs = sources(["cuda"], ".cu") if nvcc else []
    lines = [
        "ninja_required_version = 1.3",
        f"builddir = {build_dir}",  # .ninja_log and .ninja_deps go here, not into the cwd
        f"cflags = {' '.join(cflags + includes)}",
        "rule cc",
        "  command = gcc -MMD -MF $out.d $cflags -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = CC $in",
    ]
    # The soname lets a preloaded (e.g. sanitizer) build stand in for the installed one.
    ldflags = ["-shared", "-Wl,-soname,libtensor_ops.so", "-pthread", "-lm"] + (["-fsanitize=address,undefined"] if sanitize else [])
    linker = "gcc"
    if nvcc:
        archs = [a.strip() for a in os.environ.get("INFERENCE_PIO_CUDA_ARCHS", "90a").replace(",", ";").split(";")]
        archs = [a for a in archs if a]
        if "90a" in archs:
            # 9.0 is the only 9.x part: an sm_90 image beside the sm_90a one could only be loaded
            # instead of it, and its gemm_sm90 kernels only trap
            archs = [a for a in archs if a != "90"]
        gencode = " ".join(f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs)
        # gemm_sm90.cu launches its kernels only when the library has their sm_90a code
        sm90a = " -DTO_HAVE_SM90A=1" if "90a" in archs else ""
        lines += [
            f"nvcc = {nvcc}",
            f"nvflags = -O3 -std=c++17 -Xcompiler -fPIC,-fvisibility=default {gencode} "
            f"{' '.join(includes)} -DTO_WITH_CUDA=1{sm90a}",
            "rule nvcc",
            "  command = $nvcc -MD -MF $out.d $nvflags -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = NVCC $in",
        ]
        # Static cudart: the library loads where no driver exists and reports zero GPUs.
        ldflags += [f"-L{cuda_lib_dir(nvcc)}", "-lcudart_static", "-ldl", "-lrt", "-lstdc++",
                    "-Wl,--exclude-libs,ALL"]  # keep cudart private (torch may load its own)
        linker = "g++"
    lines += [
        "rule link",
        f"  command = {linker} $in -o $out {' '.join(ldflags)}",
        "  description = LINK $out",
    ]
    objs = []
    for src in c_srcs + cu_srcs:
        rel = src.relative_to(CSRC)
        obj = build_dir / "obj" / (str(rel).replace("/", "_") + ".o")
        objs.append(obj)
        lines.append(f"build {obj}: {'nvcc' if src.suffix == '.cu' else 'cc'} {src}")
    lines.append(f"build {out}: link {' '.join(map(str, objs))}")
    build_dir.mkdir(parents=True, exist_ok=True)
    ninja_file = build_dir / "build.ninja"
    text = "\n".join(lines) + "\n"
    if not ninja_file.exists() or ninja_file.read_text() != text:
        ninja_file.write_text(text)
    return ninja_file


def find_ninja():
    try:  # the PyPI `ninja` package, present in pip's isolated build environment
        import ninja
        return str(Path(ninja.BIN_DIR) / "ninja")
    except ImportError:
        pass
    exe = shutil.which("ninja")
    if not exe:
        raise SystemExit("build: ninja not found (pip install ninja)")
    return exe


def build(out, build_dir=None, sanitize=False, cuda="auto", jobs=None, verbose=False):
    """Builds the library at `out` and returns the path; `cuda` is "auto", "0" or "1"."""
    out = Path(out).resolve()
    build_dir = Path(build_dir).resolve() if build_dir else out.parent / "tensor_ops_build"
    env_cuda = os.environ.get("INFERENCE_PIO_CUDA")
    if env_cuda is not None:
        cuda = env_cuda
    nvcc = None if cuda == "0" else find_nvcc()
    if cuda == "1" and not nvcc:
        raise SystemExit("build: INFERENCE_PIO_CUDA=1 but nvcc was not found")
    ninja_file = write_ninja(build_dir, out, sanitize, nvcc)
    cmd = [find_ninja(), "-f", str(ninja_file)]
    if jobs:
        cmd += ["-j", str(jobs)]
    if verbose:
        cmd.append("-v")
    subprocess.run(cmd, check=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="path of the shared library to write")
    p.add_argument("--build-dir", help="folder for objects and build.ninja")
    p.add_argument("--sanitize", action="store_true", help="AddressSanitizer + UBSan build")
    p.add_argument("--cuda", default="auto", choices=["auto", "0", "1"])
    p.add_argument("-j", "--jobs", type=int)
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args()
    build(a.out, a.build_dir, a.sanitize, a.cuda, a.jobs, a.verbose)


if __name__ == "__main__":
    sys.exit(main())
