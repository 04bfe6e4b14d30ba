"""tools/truncate_lm: the first N layers of a model, with its embedding, norm and head."""

import json
import os
import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax.errors import UserError
from ppow_jax.models import hf, llama
from ppow_jax.tools import truncate_lm

CFG = llama.ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=4,
                        num_heads=2, num_kv_heads=1, max_position_embeddings=32,
                        initializer_range=0.3, tie_embeddings=False)


class TruncateTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.enterContext(jax.numpy_rank_promotion("allow"))
    self.dir = self.enterContext(tempfile.TemporaryDirectory())
    self.src = os.path.join(self.dir, "full")
    self.params = llama.init_params(CFG, jax.random.PRNGKey(0))
    hf.save(self.src, CFG, self.params)
    with open(os.path.join(self.src, "tokenizer_config.json"), "w") as f:
      json.dump({"bos_token": "<s>"}, f)

  def test_logits_are_the_full_models_head_on_its_layer_n_hidden(self):
    out = truncate_lm.truncate(self.src, os.path.join(self.dir, "small"), 2)
    small, small_params = hf.load(out)
    self.assertEqual(small.cfg.num_layers, 2)
    self.assertTrue(os.path.isfile(os.path.join(out, "tokenizer_config.json")))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 9)), jnp.int32)
    full = llama.Decoder(CFG)

    def head_on(layer):
      out = full.apply({"params": self.params}, tokens, hidden_layers=(layer,),
                       return_logits=False, method=llama.Decoder.forward)
      return full.apply({"params": self.params}, out.hidden_states[0],
                        method=llama.Decoder.logits_from_hidden)

    got = small.apply({"params": small_params}, tokens)
    np.testing.assert_allclose(got, head_on(2), rtol=1e-5, atol=1e-5)
    self.assertGreater(float(jnp.abs(got - head_on(3)).max()), 1e-2)  # not the next layer's

  def test_bad_layer_counts_and_a_full_output_dir_are_refused(self):
    for n in (0, 4):
      with self.assertRaisesRegex(UserError, f"--layers={n}: .* has 4 layers"):
        truncate_lm.truncate(self.src, os.path.join(self.dir, f"bad{n}"), n)
      self.assertFalse(os.path.exists(os.path.join(self.dir, f"bad{n}")))
    with self.assertRaisesRegex(UserError, "not an empty directory"):
      truncate_lm.truncate(self.src, self.src, 2)


if __name__ == "__main__":
  absltest.main()
