"""A drafter's arrays that equal its target's share the target's buffers."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax.models import decode_weights


def _tree(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {"embed_tokens": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
          "layers_0": {"w": jnp.asarray(rng.normal(size=(8, 300)), jnp.float32)},
          "layers_1": {"w": jnp.asarray(rng.normal(size=(8, 300)), jnp.float32)},
          "norm": jnp.ones((8,), jnp.float32)}


class ShareEqualArraysTest(absltest.TestCase):

  def test_equal_arrays_become_the_sources_and_others_keep_their_own(self):
    target = _tree(0)
    late = np.array(target["layers_1"]["w"])
    late[-1, -1] += 1.0  # differs after the first 64 values: only the full pass sees it
    early = np.array(target["layers_0"]["w"])
    early[0, 0] += 1.0
    drafter = {
        "embed_tokens": jnp.array(np.asarray(target["embed_tokens"])),  # a copy: shared
        "layers_0": {"w": jnp.array(np.asarray(target["layers_1"]["w"]))},  # at another path
        "layers_1": {"w": jnp.asarray(late)},
        "layers_2": {"w": jnp.asarray(early)},
        "norm": target["norm"].astype(jnp.bfloat16),  # another dtype: not shared
        "head": jnp.asarray(np.asarray(target["embed_tokens"])[:, :4]),  # no array of its shape
    }
    out = decode_weights.share_equal_arrays(target, drafter)
    self.assertIs(out["embed_tokens"], target["embed_tokens"])
    self.assertIs(out["layers_0"]["w"], target["layers_1"]["w"])
    for path in (("layers_1", "w"), ("layers_2", "w")):
      self.assertIs(out[path[0]][path[1]], drafter[path[0]][path[1]])
    self.assertIs(out["norm"], drafter["norm"])
    self.assertIs(out["head"], drafter["head"])
    # every value is the drafter's own, whichever buffer holds it
    jax.tree_util.tree_map(np.testing.assert_array_equal, out, drafter)

  def test_the_same_path_is_taken_first_and_nan_is_never_equal(self):
    target = _tree(1)
    target["layers_1"]["w"] = jnp.array(np.asarray(target["layers_0"]["w"]))  # twins
    drafter = jax.tree_util.tree_map(lambda x: jnp.array(np.asarray(x)), target)
    out = decode_weights.share_equal_arrays(target, drafter)
    self.assertIs(out["layers_1"]["w"], target["layers_1"]["w"])
    self.assertIs(out["layers_0"]["w"], target["layers_0"]["w"])
    nan_target, nan_drafter = {"norm": jnp.full((8,), jnp.nan)}, {"norm": jnp.full((8,), jnp.nan)}
    out = decode_weights.share_equal_arrays(nan_target, nan_drafter)
    self.assertIs(out["norm"], nan_drafter["norm"])
    self.assertIsNone(decode_weights.share_equal_arrays(target, None))
    self.assertIs(decode_weights.share_equal_arrays(None, drafter), drafter)


if __name__ == "__main__":
  absltest.main()
