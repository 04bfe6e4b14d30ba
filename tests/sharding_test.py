"""Meshes, rules and shardings on 8 fake CPU devices (tests/conftest.py sets them up)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import importlib.util
import re
import types
from unittest import mock

from absl.testing import absltest, parameterized
from flax import traverse_util
import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from ppow_jax import sharding
from ppow_jax.errors import UserError
from ppow_jax.models import eagle3, llama, presets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENOUGH_DEVICES = jax.device_count() >= 8
NEED_8 = ("needs 8 devices: run under pytest (tests/conftest.py) or set "
          "XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts")


def _shipped_config(name: str = "llama31_8b_eagle3", arg: str = "tpu_v5p"):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


CONFIG = _shipped_config()
TINY = presets.get_preset("tiny")  # float32
DRAFTER = eagle3.Eagle3Config.from_target(TINY, draft_vocab_size=128)
NAMES = sharding.logical_names(sharding.abstract_params(TINY)) | sharding.logical_names(
    sharding.abstract_params(DRAFTER))
WEIGHT_RULES, ACT_RULES = sharding.rules_from_config(CONFIG, NAMES)
MESH_CFG = ml_collections.ConfigDict({"axes": ("data", "fsdp", "tensor"),
                                      "ici_shape": (1, -1, 4), "dcn_shape": (1, 1, 1)})

# The shipped rules on the parameters of a tiny target and EAGLE-3 drafter. Each parameter
# path must match exactly one pattern; every pattern must match something.
ATTN_IN = ("fsdp", "tensor", None)  # [embed, heads | kv_heads, head_dim]
EXPECTED = {
    "target": (
        (r"embed_tokens", ("tensor", "fsdp")),
        (r"lm_head", ("fsdp", "tensor")),
        (r"(layers_\d+/(input|post_attention)_layernorm/|norm/)scale", ("fsdp",)),
        (r"layers_\d+/self_attn/[qkv]_proj", ATTN_IN),
        (r"layers_\d+/self_attn/o_proj", ("tensor", None, "fsdp")),
        (r"layers_\d+/mlp/(gate|up)_proj", ("fsdp", "tensor")),
        (r"layers_\d+/mlp/down_proj", ("tensor", "fsdp")),
    ),
    "drafter": (
        (r"fc", (None, "fsdp")),
        (r"(midlayer/(input|hidden|post_attention)_(layer)?norm/|norm/)scale", ("fsdp",)),
        (r"midlayer/self_attn/[qkv]_proj", ATTN_IN),
        (r"midlayer/self_attn/o_proj", ("tensor", None, "fsdp")),
        (r"midlayer/mlp/(gate|up)_proj", ("fsdp", "tensor")),
        (r"midlayer/mlp/down_proj", ("tensor", "fsdp")),
        (r"lm_head", ("fsdp", "tensor")),
    ),
}


def _norm(spec) -> tuple:
  """PartitionSpec as a tuple without trailing Nones (P('a', None) == P('a'))."""
  entries = list(spec)
  while entries and entries[-1] is None:
    entries.pop()
  return tuple(entries)


def _flat(tree) -> dict:
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


class RulesTest(parameterized.TestCase):

  @parameterized.parameters("target", "drafter")
  def test_every_parameter_gets_the_spec_the_rules_say(self, which):
    cfg = TINY if which == "target" else DRAFTER
    specs = _flat(sharding.mesh_specs(sharding.abstract_params(cfg), WEIGHT_RULES))
    used = set()
    for path, spec in specs.items():
      hits = [i for i, (pattern, _) in enumerate(EXPECTED[which]) if re.fullmatch(pattern, path)]
      self.assertLen(hits, 1, f"{which} parameter {path} matches patterns {hits}")
      used.add(hits[0])
      self.assertEqual(_norm(spec), _norm(EXPECTED[which][hits[0]][1]), f"{which} {path}")
    self.assertLen(used, len(EXPECTED[which]), "a pattern matched no parameter")

  def test_replicated_drafter_and_activation_specs(self):
    specs = _flat(sharding.mesh_specs(sharding.abstract_params(DRAFTER), None))
    self.assertTrue(specs and all(_norm(s) == () for s in specs.values()))
    self.assertEqual(_norm(sharding.batch_spec(ACT_RULES)), (("data", "fsdp"),))
    self.assertEqual(_norm(sharding.spec_for(sharding.CACHE_AXES, ACT_RULES)),
                     (("data", "fsdp"), "tensor"))

  @parameterized.named_parameters(
      ("conflict", [("vocab", "tensor"), ("embed", "fsdp"), ("vocab", None)],
       r"weight_rules\[2\]=\('vocab', None\) conflicts with .*weight_rules\[0\]"),
      ("unknown_axis", [("embed", "model")],
       r"weight_rules\[0\]=\('embed', 'model'\): mesh axis 'model' is not in the mesh"),
      ("unknown_axis_in_tuple", [("embed", ("fsdp", "seq"))],
       r"weight_rules\[0\]=\('embed', \('fsdp', 'seq'\)\): mesh axis 'seq'"),
      ("unused", [("embed", "fsdp"), ("emb", "tensor")],
       r"weight_rules\[1\]=\('emb', 'tensor'\) is unused"),
      ("malformed", [("embed",)], r"weight_rules\[0\]=\('embed',\): a rule is"),
      ("repeated_axis", [("embed", ("fsdp", "fsdp"))], r"weight_rules\[0\].*repeated"),
  )
  def test_bad_rules_raise_naming_the_rule(self, rules, pattern):
    with self.assertRaisesRegex(UserError, "sharding." + pattern):
      sharding.validate_rules(rules, MESH_CFG.axes, NAMES, "sharding.weight_rules")

  def test_rules_from_config_checks_activation_rules_and_drafter_mode(self):
    config = _shipped_config()
    config.sharding.activation_rules = config.sharding.activation_rules + (("batch", None),)
    with self.assertRaisesRegex(UserError, r"activation_rules\[8\].*conflicts"):
      sharding.rules_from_config(config, NAMES)
    config = _shipped_config()
    config.sharding.drafter_params = "zero3"
    with self.assertRaisesRegex(UserError, "sharding.drafter_params"):
      sharding.rules_from_config(config, NAMES)


class MeshTest(parameterized.TestCase):

  @parameterized.parameters(
      ((-1, 2, 2), (1, 1, 1), 8, (2, 2, 2)),
      ((1, -1, 4), (1, 1, 1), 8, (1, 2, 4)),
      ((1, 1, 4), (-1, 1, 1), 8, (2, 1, 4)),
      ((-1, 1, 4), (2, 1, 1), 16, (4, 1, 4)),
      ((2, 2, 2), (1, 1, 1), 8, (2, 2, 2)),
  )
  def test_shape_auto_fill(self, ici, dcn, n, expected):
    cfg = ml_collections.ConfigDict({"axes": ("data", "fsdp", "tensor"), "ici_shape": ici,
                                     "dcn_shape": dcn})
    self.assertEqual(tuple(sharding.mesh_shape(cfg, n).values()), expected)

  @parameterized.named_parameters(
      ("wrong_product", (3, 1, 1), (1, 1, 1), r"mesh.ici_shape=\(3, 1, 1\).*8 are available"),
      ("not_a_multiple", (-1, 3, 1), (1, 1, 1), r"mesh.ici_shape=\(-1, 3, 1\).*not a multiple"),
      ("two_holes", (-1, -1, 1), (1, 1, 1), r"at most one -1"),
      ("wrong_rank", (-1, 4), (1, 1, 1), r"mesh.ici_shape=\(-1, 4\) must have one entry"),
      ("zero", (0, 8, 1), (1, 1, 1), r"mesh.ici_shape=\(0, 8, 1\): entries must be positive"),
  )
  def test_bad_shapes_raise_naming_the_field(self, ici, dcn, pattern):
    cfg = ml_collections.ConfigDict({"axes": ("data", "fsdp", "tensor"), "ici_shape": ici,
                                     "dcn_shape": dcn})
    with self.assertRaisesRegex(UserError, pattern):
      sharding.mesh_shape(cfg, 8)

  def test_multi_slice_grid_keeps_each_slice_contiguous_along_dcn(self):
    fake = [types.SimpleNamespace(id=i, slice_index=i // 4, process_index=0, platform="fake",
                                  device_kind="fake") for i in range(8)]
    cfg = ml_collections.ConfigDict({"axes": ("data", "fsdp", "tensor"),
                                     "ici_shape": (1, 1, -1), "dcn_shape": (2, 1, 1)})
    grid = sharding.device_grid(cfg, fake)
    self.assertEqual(grid.shape, (2, 1, 4))
    self.assertEqual([[d.slice_index for d in row] for row in grid[:, 0]], [[0] * 4, [1] * 4])
    cfg.dcn_shape = (1, 1, 2)  # 2 slices along tensor, but the slices are 0 and 1 of 4 each
    cfg.ici_shape = (1, 1, 4)
    with self.assertRaises(UserError):
      sharding.device_grid(cfg, fake[:4] + [types.SimpleNamespace(**{**vars(d), "slice_index": 0})
                                           for d in fake[4:]])

  @absltest.skipUnless(ENOUGH_DEVICES, NEED_8)
  def test_make_mesh(self):
    mesh = sharding.make_mesh(MESH_CFG)
    self.assertEqual(dict(mesh.shape), {"data": 1, "fsdp": 2, "tensor": 4})
    with self.assertRaisesRegex(UserError, "mesh.ici_shape"):
      sharding.make_mesh(MESH_CFG, jax.devices()[:6])


@absltest.skipUnless(ENOUGH_DEVICES, NEED_8)
class ShardedModelTest(absltest.TestCase):
  """One tiny target, initialised and run once on 1 device and once on fsdp 2 x tensor 4."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.mesh = sharding.make_mesh(MESH_CFG)
    boxed = sharding.abstract_params(TINY)
    cls.abstract = nn.unbox(boxed)
    cls.shardings = sharding.to_named(sharding.mesh_specs(boxed, WEIGHT_RULES), cls.mesh)
    cls.params = llama.init_params(TINY, jax.random.key(0))  # whole, on one device
    cls.sharded = sharding.shard_params(cls.params, cls.shardings)

  def test_shard_params_places_every_parameter(self):
    resharded = sharding.shard_params(jax.device_get(self.params), self.shardings)
    for (path, x), s, y, a in zip(jax.tree_util.tree_flatten_with_path(self.sharded)[0],
                                  jax.tree_util.tree_leaves(self.shardings),
                                  jax.tree_util.tree_leaves(resharded),
                                  jax.tree_util.tree_leaves(self.abstract)):
      where = jax.tree_util.keystr(path)
      self.assertEqual((x.shape, x.dtype), (a.shape, a.dtype), where)
      self.assertTrue(x.sharding.is_equivalent_to(s, x.ndim), where)
      self.assertTrue(y.sharding.is_equivalent_to(s, y.ndim), where)
      np.testing.assert_array_equal(np.asarray(y), np.asarray(x))

  def test_each_device_holds_its_share_of_the_target(self):
    leaves = jax.tree_util.tree_leaves(self.sharded)
    total = sum(x.nbytes for x in leaves)
    axis_sizes = dict(self.mesh.shape)
    per_device = {d: 0 for d in self.mesh.devices.flat}
    for x in leaves:
      for shard in x.addressable_shards:
        per_device[shard.device] += shard.data.nbytes
    # The memory plan's arithmetic predicts every device's bytes exactly.
    planned = sum(sharding.bytes_per_device(x.shape, x.dtype, x.sharding.spec, axis_sizes)
                  for x in leaves)
    self.assertEqual(set(per_device.values()), {planned})
    # Only the small norm scales are replicated over "tensor": within 10% of a perfect split.
    self.assertLessEqual(planned, 1.1 * total / self.mesh.size)

  def test_sharded_forward_matches_one_device(self):
    tokens = jax.random.randint(jax.random.key(1), (8, 8), 0, TINY.vocab_size)
    model = llama.Decoder(TINY)
    forward = lambda p, t: model.apply({"params": p}, t)
    want = jax.jit(forward)(self.params, tokens)
    with sharding.activation_context(self.mesh, ACT_RULES):
      batch = sharding.global_batch(np.asarray(tokens), self.mesh,
                                    sharding.batch_spec(ACT_RULES))
      got = jax.jit(forward)(self.sharded, batch)
    self.assertEqual(_norm(batch.sharding.spec), (("data", "fsdp"),))
    logits_spec = jax.sharding.NamedSharding(self.mesh, P(("data", "fsdp"), None, "tensor"))
    self.assertTrue(got.sharding.is_equivalent_to(logits_spec, 3), got.sharding)
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4,
                               atol=1e-6 * float(np.abs(want).max()))


class ProcessTest(absltest.TestCase):

  def test_distributed_only_when_asked(self):
    with mock.patch.object(jax.distributed, "initialize") as init, \
        mock.patch.object(jax.config, "update"):
      with mock.patch.dict(os.environ, {"PPOW_DISTRIBUTED": "0"}):
        self.assertFalse(sharding.maybe_initialize_distributed())
      init.assert_not_called()
      with mock.patch.dict(os.environ, {"PPOW_DISTRIBUTED": "1"}):
        for name in ("PPOW_NUM_PROCESSES", "PPOW_PROCESS_ID"):
          os.environ.pop(name, None)
        self.assertTrue(sharding.maybe_initialize_distributed())
      init.assert_called_once_with()  # a pod or SLURM: JAX detects the layout
    self.assertTrue(sharding.is_primary())

  def test_process_count_and_id_from_the_environment(self):
    """What launch/local_multiprocess.sh sets; bad values are one-line errors."""
    with mock.patch.object(jax.distributed, "initialize") as init, \
        mock.patch.object(jax.config, "update"):
      with mock.patch.dict(os.environ, {"PPOW_DISTRIBUTED": "1", "PPOW_NUM_PROCESSES": "2",
                                        "PPOW_PROCESS_ID": "1"}):
        self.assertTrue(sharding.maybe_initialize_distributed())
      init.assert_called_once_with(num_processes=2, process_id=1)
      for count, pid, message in (("2", "", "set both"), ("two", "0", "as integers"),
                                  ("2", "2", r"PPOW_PROCESS_ID=2 is not in \[0, ")):
        with mock.patch.dict(os.environ, {"PPOW_DISTRIBUTED": "1", "PPOW_NUM_PROCESSES": count,
                                          "PPOW_PROCESS_ID": pid}):
          with self.assertRaisesRegex(UserError, message):
            sharding.maybe_initialize_distributed()
      init.assert_called_once()


if __name__ == "__main__":
  absltest.main()
