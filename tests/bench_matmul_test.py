"""bench.matmul: the chain's shapes, both variants computing the same chain, flag errors."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest

from ppow_jax import cpu_gemv
from ppow_jax.bench import matmul
import tool_errors  # tests/tool_errors.py


class MatmulBenchTest(absltest.TestCase):

  def test_chain_shapes_follow_a_decode_step(self):
    shapes = matmul.chain_shapes(hidden=8, qkv=12, intermediate=20, layers=2, vocab=30)
    self.assertEqual(shapes, [(12, 8), (8, 8), (40, 8), (8, 20)] * 2 + [(30, 8)])
    self.assertEqual(matmul.chain_shapes(8, 12, 20, 1, 0)[-1], (8, 20))

  @absltest.skipUnless(cpu_gemv.available(), "no C++ compiler")
  def test_both_variants_run_the_same_chain(self):
    shapes = matmul.chain_shapes(hidden=32, qkv=48, intermediate=40, layers=2, vocab=100)
    r = matmul.measure([1, 3], shapes, repeats=1)
    self.assertEqual(set(r["rows"]), {"1", "3"})
    self.assertEqual(r["products"], 9)
    for res in r["rows"].values():
      self.assertGreater(res["kernel"]["ms"], 0)
      self.assertGreater(res["xla"]["ms"], 0)
    self.assertIn("rows", matmul.format_table(r))

  def test_bad_flags_exit_with_one_line_naming_them(self):
    for flag, message in (("--rows=0", "--rows: 0 is outside 1..64"),
                          ("--rows=x", "--rows: want comma-separated integers, got x"),
                          ("--layers=0", "--layers must be >= 1, got 0"),
                          # cli.run_main: the tools take flags only
                          ("stray", "unexpected arguments: stray")):
      with self.subTest(flag=flag):
        tool_errors.assert_exits_naming(self, "ppow_jax.bench.matmul", [flag], message)


if __name__ == "__main__":
  absltest.main()
