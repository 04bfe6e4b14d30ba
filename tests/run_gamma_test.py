"""The PPOW stage's measured γ prices both models as the eval stage decodes them."""

import os
from unittest import mock

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest
import jax
import numpy as np

from ppow_jax import cli, drafters, run
from ppow_jax.models import eagle3, llama

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "tiny.py")
TARGET = llama.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, max_position_embeddings=128)


def _fused(params) -> bool:
  paths = jax.tree_util.tree_leaves_with_path(params)
  return any("qkv_proj_t" in jax.tree_util.keystr(p) for p, _ in paths)


class MeasuredGammaTest(absltest.TestCase):

  def test_gamma_is_measured_on_the_decoding_layout_of_both_models(self):
    tp = llama.init_params(TARGET, jax.random.PRNGKey(0))
    ecfg = eagle3.Eagle3Config.from_target(TARGET, draft_vocab_size=48)
    drafter = drafters.Eagle3FeatureDrafter.create(ecfg, TARGET)
    dparams = {"net": eagle3.init_eagle3(ecfg, jax.random.PRNGKey(1)),
               "vocab": eagle3.build_draft_vocab(np.arange(64.0)[::-1], 48)}
    self.assertFalse(_fused(tp) or _fused(dparams))  # the training layout goes in
    c = cli.load_config(TINY)
    c.ppow.gamma, c.ppow.window, c.eval.prompt_len = -1.0, 3, 8
    layouts, measure = [], run.gamma_lib.measure_gamma

    def spy(cfg, target_params, drafter_, params, *args, **kwargs):
      layouts.append((_fused(target_params), _fused(params)))
      return measure(cfg, target_params, drafter_, params, *args, **kwargs)
    with mock.patch.object(run.gamma_lib, "measure_gamma", spy):
      g = run._gamma(c, TARGET, tp, drafter, dparams)
      c.ppow.gamma = 0.25
      self.assertEqual(run._gamma(c, TARGET, tp, drafter, dparams), 0.25)  # not measured
    self.assertEqual(layouts, [(True, True)])
    self.assertGreater(g, 0.0)


if __name__ == "__main__":
  absltest.main()
