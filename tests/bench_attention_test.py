"""bench.attention: both variants compute the same attention; flag errors."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest

from ppow_jax import cpu_gemv
from ppow_jax.bench import attention
import tool_errors  # tests/tool_errors.py


class AttentionBenchTest(absltest.TestCase):

  @absltest.skipUnless(cpu_gemv.available(), "no C++ compiler")
  def test_both_variants_run_and_agree(self):
    r = attention.measure(batch=2, tokens=3, heads=4, kv_heads=2, head_dim=16, slots=20,
                          visible=9, layers=2, calls=3, repeats=1)
    self.assertEqual(r["rows_per_kv_head"], 6)
    self.assertGreater(r["kernel_us"], 0)
    self.assertGreater(r["xla_us"], 0)

  def test_bad_flags_exit_with_one_line_naming_them(self):
    for flag, message in (("--tokens=0", "--tokens: every value must be >= 1, got 0"),
                          ("--batch_sizes=x", "--batch_sizes: want comma-separated integers"),
                          ("--kv_heads=3", "--kv_heads=3 must divide --heads=8"),
                          ("--visible=199", "--visible=199 must be in 1..--slots - tokens")):
      with self.subTest(flag=flag):
        tool_errors.assert_exits_naming(self, "ppow_jax.bench.attention", [flag], message)


if __name__ == "__main__":
  absltest.main()
