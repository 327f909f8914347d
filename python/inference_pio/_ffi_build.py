"""The cffi builder (API mode) for inference_pio._tensor_ops.

The cdef is cut out of csrc/include/tensor_ops.h between its CDEF markers, so the header is the
one source of truth for the C API. The extension links against libtensor_ops.so, which setup.py
builds first, places next to it and adds to the extension's library_dirs (found at run time
through an $ORIGIN rpath).
"""
import re
from pathlib import Path

import cffi

ROOT = Path(__file__).resolve().parents[2]
HEADER = ROOT / "csrc" / "include" / "tensor_ops.h"


def cdef_text(header=HEADER):
    text = header.read_text()
    m = re.search(r"/\* CDEF-BEGIN \*/(.*)/\* CDEF-END \*/", text, re.S)
    if not m:
        raise RuntimeError(f"{header}: CDEF markers not found")
    return m.group(1)


def make_builder():
    ffi = cffi.FFI()
    ffi.cdef(cdef_text())
    ffi.set_source(
        "inference_pio._tensor_ops",
        '#include "tensor_ops.h"',
        include_dirs=[str(HEADER.parent)],
        libraries=["tensor_ops"],
        extra_link_args=["-Wl,-rpath,$ORIGIN"],
    )
    return ffi


ffibuilder = make_builder()
