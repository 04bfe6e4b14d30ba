"""pytest collects the absltest suites; fake 8 CPU devices before JAX starts."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tests are compile-bound (tiny models): skipping XLA's backend optimisations halves them.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One on-disk XLA compile cache for every test process and every subprocess a test starts
# (the CLI runs, the multi-process job): a program compiled once is loaded after that. It
# persists between runs under .cache/ (git-ignored); entries are keyed by the program, the
# flags and the JAX version, so a stale entry is never used.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "xla-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

# The longest test classes (seconds each, subprocesses included) start first, one per test
# process, so that the short ones fill in around them instead of waiting behind them.
_FIRST = ("tests/main_e2e_test.py::MainPipelineTest", "tests/multihost_test.py")


def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = lambda item: next((i for i, p in enumerate(_FIRST) if item.nodeid.startswith(p)),
                           len(_FIRST))
  items.sort(key=rank)  # stable: the order within each group is kept
