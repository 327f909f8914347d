"""Build: libtensor_ops.so (C, plus CUDA where nvcc is found) with ninja, then the cffi
extension inference_pio._tensor_ops over it. Both land in the inference_pio package folder, so
regular and editable installs find the library next to the extension."""
import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildWithLibrary(build_ext):
    def run(self):
        csrc_build = load(ROOT / "csrc" / "build.py", "tensor_ops_build")
        pkg_dir = Path(self.get_ext_fullpath("inference_pio._tensor_ops")).parent
        pkg_dir.mkdir(parents=True, exist_ok=True)
        lib = csrc_build.build(Path(self.build_temp).resolve() / "libtensor_ops.so",
                               jobs=self.parallel or None)
        # copy then rename: a process that has the old library mapped keeps its (unlinked) copy
        tmp = pkg_dir / "libtensor_ops.so.tmp"
        shutil.copy2(lib, tmp)
        os.replace(tmp, pkg_dir / "libtensor_ops.so")
        include_dir = pkg_dir / "include"
        include_dir.mkdir(exist_ok=True)
        shutil.copy2(ROOT / "csrc" / "include" / "tensor_ops.h", include_dir / "tensor_ops.h")
        for ext in self.extensions:
            if ext.name == "inference_pio._tensor_ops":
                ext.library_dirs.append(str(pkg_dir))
        super().run()


setup(
    cmdclass={"build_ext": BuildWithLibrary},
    ext_modules=[Extension("inference_pio._buffer", ["python/inference_pio/_buffer.c"])],
    cffi_modules=["python/inference_pio/_ffi_build.py:ffibuilder"],
)
