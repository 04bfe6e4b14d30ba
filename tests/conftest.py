"""pytest collects the absltest suites; fake 8 CPU devices before JAX starts."""
import os

# Tests are compile-bound (tiny models): skipping XLA's backend optimisations halves them.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
