"""bench.profile: HLO instructions named by their place in the model, trace events summed per
step, and one profiled run of a small pair."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest

from ppow_jax import cpu_gemv
from ppow_jax.bench import pairs, profile
import tool_errors  # tests/tool_errors.py

_HLO = """
  %ffi_call.7 = f32[1,96]{1,0} custom-call(%a, %b), custom_call_target="ppow_cpu_matmul_t_f32"
  %ffi_call.9 = f32[1,1,4,8]{3,2,1,0} custom-call(%q, %k, %v, %m), custom_call_target="ppow_cpu_attention_f32", metadata={op_name="x"}
  %add_rsqrt_fusion.3 = f32[1]{0} fusion(%p), kind=kLoop, metadata={op_name="jit(_autoregressive)/while/body/Decoder.forward/layers_3/input_layernorm/rsqrt"}
  %add_rsqrt_fusion.4 = f32[1]{0} fusion(%p), kind=kLoop, metadata={op_name="jit(_autoregressive)/while/body/Decoder.forward/layers_12/input_layernorm/rsqrt"}
  ROOT %while.2 = (s32[]) while(%t), condition=%c, body=%b, metadata={op_name="jit(_autoregressive)/while"}
"""


class ProfileTest(absltest.TestCase):

  def test_names_and_sums_per_step(self):
    names = profile.op_names(_HLO)
    self.assertEqual(names["ffi_call.7"], "matmul kernel")
    self.assertEqual(names["ffi_call.9"], "attention kernel")
    norm = "while/body/Decoder.forward/layers_L/input_layernorm/rsqrt"
    self.assertEqual(names["add_rsqrt_fusion.3"], norm)
    self.assertEqual(names["add_rsqrt_fusion.4"], norm)
    events = [{"ph": "X", "name": "ffi_call.7", "dur": 30.0},
              {"ph": "X", "name": "ffi_call.7", "dur": 10.0},
              {"ph": "X", "name": "ffi_call.9", "dur": 8.0},
              {"ph": "X", "name": "add_rsqrt_fusion.3", "dur": 2.0},
              {"ph": "X", "name": "add_rsqrt_fusion.4", "dur": 4.0},
              {"ph": "X", "name": "while.2", "dur": 500.0},  # a container: its children count
              {"ph": "i", "name": "ffi_call.7", "dur": 99.0},  # not a complete event
              {"ph": "X", "name": "not_in_the_hlo", "dur": 99.0}]
    rows = profile.aggregate(events, names, steps=2)
    self.assertEqual([(r["op"], r["us_per_step"], r["calls_per_step"]) for r in rows],
                     [("matmul kernel", 20.0, 1.0),
                      ("attention kernel", 4.0, 0.5),
                      (norm + " [add_rsqrt_fusion]", 3.0, 1.0)])

  def test_a_profiled_run_counts_the_kernels_calls_per_step(self):
    spec = pairs.SyntheticSpec(num_layers=2, hidden_size=64, intermediate_size=128,
                               vocab_size=256, num_heads=4, num_kv_heads=2)
    p = pairs.synthetic_pair(spec)
    r = profile.profile(p.target_cfg, p.target_params, p.drafter, p.draft_params, "ar",
                        batch=1, window=2, max_new_tokens=6, prompt_len=8, runs=1)
    self.assertGreater(r["steps_per_run"], 0)
    ops = {x["op"]: x for x in r["ops"]}
    self.assertGreater(r["us_per_step_listed"], 0)
    if cpu_gemv.available():  # 4 products per layer and the head each step, prompt pass aside
      self.assertGreaterEqual(ops["matmul kernel"]["calls_per_step"], 4 * 2 + 1)
      self.assertGreaterEqual(ops["attention kernel"]["calls_per_step"], 2)
    self.assertIn("µs/token", profile.format_table(r, 5))

  def test_bad_flags_exit_with_one_line_naming_them(self):
    for flag, message in (("--batch=0", "--batch must be >= 1, got 0"),
                          ("--mode=spec --target=x", "--mode=spec with --target needs --drafter")):
      with self.subTest(flag=flag):
        tool_errors.assert_exits_naming(self, "ppow_jax.bench.profile", flag.split(), message)


if __name__ == "__main__":
  absltest.main()
