"""Inference-PIO: a dependency-free LLM inference engine.

The numeric work runs in libtensor_ops (C, plus CUDA where it was built with nvcc); this package
is the thin layer over it: Tensor, the op functions, and Module with the common layers.
"""
from . import dtypes, nn, ops
from ._lib import (BoundsError, CudaError, DeviceError, DTypeError, InvalidArgumentError,
                   OutOfMemoryError, ShapeError, TensorOpsError, UnsupportedError, ffi, lib)
from .dtypes import bfloat16, float16, float32, int8, int32, int64, uint8
from .tensor import Tensor, tensor
from .runtime import cuda_device_count, num_threads, set_num_threads, simd_level
from .engine import LLM, CompletionOutput, RequestOutput, SamplingParams, StreamDelta
from .engine import BeamHypothesis, BeamSearchOutput, BeamSearchParams

__version__ = "0.1.0"
