"""Running the train steps and generation on the device mesh: one object the stages hold.

``Parallel`` bundles the mesh with the weight and activation rules of ``config.sharding``
(``ppow_jax/sharding.py`` does the rule arithmetic) and offers the few calls a stage needs:

* ``place_target`` / ``place_train_state`` / ``place_batch`` / ``place_replicated`` put host
  values on the mesh. Placement is the single source of truth for shardings: the jitted step
  reads its ``in_shardings`` off the placed arguments, so what is placed is what is compiled.
* ``jit_train_step`` jits a ``train_step`` step (pjit: explicit in/out shardings, the state
  donated) and runs it under the activation rules, so the models'
  ``nn.with_logical_constraint`` calls shard activations the same way as the weights.

Sharded and single-device runs compute the same values (up to float reduction order):
random numbers do not depend on the sharding (``jax_threefry_partitionable``, on by default).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from ppow_jax.data.pipeline import BATCH_KEYS
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ppow_jax import sharding, train_step
from ppow_jax.drafters import Drafter
from ppow_jax.errors import UserError
from ppow_jax.models import eagle3, llama


@functools.lru_cache(maxsize=1)
def model_param_names() -> frozenset:
  """Every logical axis name a parameter of any model here can carry (target, LM drafter,
  EAGLE-3; with the optional q/k norms and qkv biases), from tiny abstract models: rules are
  validated against the models themselves, so a rule for a renamed axis fails loudly."""
  t = llama.ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                        num_heads=2, num_kv_heads=1, qkv_bias=True, qk_norm=True)
  e = eagle3.Eagle3Config.from_target(t, draft_vocab_size=8)
  return frozenset(sharding.logical_names(sharding.abstract_params(t))
                   | sharding.logical_names(sharding.abstract_params(e)))


def _shardings_of(tree: Any, what: str) -> Any:
  """The ``.sharding`` of every leaf (placed ``jax.Array`` s or sharded ``ShapeDtypeStruct`` s)."""
  def get(x):
    s = getattr(x, "sharding", None)
    if s is None:
      raise UserError(f"jit_train_step: a leaf of {what} ({type(x).__name__}) has no sharding; "
                      f"place it first (Parallel.place_*)")
    return s
  return jax.tree_util.tree_map(get, tree)


def _mirror_params(opt_state: Any, params: Any, param_shardings: Any, other: NamedSharding
                   ) -> Any:
  """Shardings for an optax state: every subtree shaped exactly like the params (Adam's mu
  and nu, ...) gets the params' shardings; everything else (step counts, empty states) is
  replicated. Works on concrete and abstract (``eval_shape``) states alike."""
  p_def = jax.tree_util.tree_structure(params)
  p_shapes = [np.shape(x) for x in jax.tree_util.tree_leaves(params)]

  def mirrors(x) -> bool:
    if jax.tree_util.tree_structure(x) != p_def:
      return False
    return [np.shape(y) for y in jax.tree_util.tree_leaves(x)] == p_shapes

  return jax.tree_util.tree_map(lambda x: param_shardings if mirrors(x) else other, opt_state,
                                is_leaf=mirrors)


@dataclasses.dataclass(frozen=True)
class Parallel:
  """The mesh and rules of one run; see the module docstring."""
  mesh: Mesh
  weight_rules: sharding.Rules
  activation_rules: sharding.Rules
  drafter_params: str = "replicated"  # "fsdp": drafter follows the weight rules
  # XLA options for the compiled train steps, e.g. {"xla_backend_optimization_level": 0}
  # (tests: CPU compiles several times faster). Not part of the config: a code-level switch.
  compiler_options: Optional[dict] = dataclasses.field(default=None, hash=False)

  @classmethod
  def from_config(cls, config, devices: Optional[Sequence[Any]] = None) -> "Parallel":
    """From ``config.mesh`` and ``config.sharding`` (rules validated: errors name the rule)."""
    weight, act = sharding.rules_from_config(config, sorted(model_param_names()))
    return cls(sharding.make_mesh(config.mesh, devices), weight, act,
               config.sharding.drafter_params)

  @classmethod
  def single_device(cls, config, device: Optional[Any] = None) -> "Parallel":
    """A 1x1x1 mesh on one device with ``config``'s rules: the same code path as a real mesh,
    every array whole on one device (tests, references)."""
    config = config.copy_and_resolve_references()
    config.mesh.ici_shape = config.mesh.dcn_shape = (1,) * len(config.mesh.axes)
    return cls.from_config(config, [device or jax.devices()[0]])

  # ---- Shardings -----------------------------------------------------------------------------

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batch_sharding(self) -> NamedSharding:
    """Rows split over the ``batch`` rule's axes, other dims whole (any rank >= 1)."""
    return NamedSharding(self.mesh, sharding.batch_spec(self.activation_rules, 1))

  @property
  def batch_shards(self) -> int:
    """Devices a batch's rows are split over: global batch sizes must be multiples of it."""
    return sharding.num_shards(self.batch_sharding.spec[0], dict(self.mesh.shape))

  def activation_context(self):
    """Inside, ``nn.with_logical_constraint`` shards activations on this mesh."""
    return sharding.activation_context(self.mesh, self.activation_rules)

  def target_shardings(self, target_cfg: llama.ModelConfig) -> Any:
    """NamedShardings of the frozen target by the weight rules."""
    return self._param_shardings(target_cfg, self.weight_rules, "target parameter")

  def trainable_shardings(self, drafter: Drafter) -> Any:
    """NamedShardings of the drafter's trainable params (``train_step.split_params``'s first
    half: EAGLE-3's network, or the whole LM drafter)."""
    rules = self.weight_rules if self.drafter_params == "fsdp" else None
    return self._param_shardings(drafter.cfg, rules, "drafter parameter")

  def train_state_shardings(self, drafter: Drafter, state: train_step.TrainState
                            ) -> train_step.TrainState:
    """A TrainState of NamedShardings for ``state`` (concrete or abstract, e.g. for a
    checkpoint restore): params per ``drafter_params``, the optimizer state mirroring them,
    step, rng and PPOW's ADAW pool replicated."""
    return self._state_shardings(state, self.trainable_shardings(drafter))

  def _state_shardings(self, state: train_step.TrainState, params: Any
                       ) -> train_step.TrainState:
    opt = _mirror_params(state.opt_state, state.params, params, self.replicated)
    return state.replace(step=self.replicated, params=params, opt_state=opt,
                         rng=self.replicated,
                         pool=jax.tree_util.tree_map(lambda _: self.replicated, state.pool))

  def _param_shardings(self, model_cfg, rules: Optional[sharding.Rules], what: str) -> Any:
    """From the model's abstract params (nothing allocated); ``rules=None``: replicated.
    A dim that does not divide over its mesh axes is a UserError naming the parameter."""
    boxed = sharding.abstract_params(model_cfg)
    specs = sharding.mesh_specs(boxed, rules)
    sharding.check_divisible(boxed, specs, dict(self.mesh.shape), what)
    return sharding.to_named(specs, self.mesh)

  # ---- Placement -----------------------------------------------------------------------------

  def place_target(self, target_cfg: llama.ModelConfig, params: Any) -> Any:
    """The frozen target sharded by the weight rules (no optimizer state: it is not trained)."""
    return sharding.shard_params(params, self.target_shardings(target_cfg))

  def place_train_state(self, drafter: Drafter, state: train_step.TrainState
                        ) -> train_step.TrainState:
    """Drafter params and optimizer state FSDP-sharded or replicated (``drafter_params``)."""
    return jax.device_put(state, self.train_state_shardings(drafter, state))

  def place_target_state(self, target_cfg: llama.ModelConfig, state: train_step.TrainState
                         ) -> train_step.TrainState:
    """The embedded target's pretraining state: parameters by the weight rules, the optimizer
    state mirroring them, the rest replicated."""
    return jax.device_put(state, self._state_shardings(state, self.target_shardings(target_cfg)))

  def place_replicated(self, tree: Any) -> Any:
    """Small constants (EAGLE-3's vocab maps, rng keys) whole on every device."""
    return jax.device_put(tree, self.replicated)

  def place_batch(self, batch: Any) -> Any:
    """Global arrays from the global batch, split over the batch axes.

    Every host passes the same whole batch (``datasets`` reads the same stream on each), so a
    run's batches do not depend on how many hosts it has; each host copies only the rows of
    its own devices (``sharding.global_batch``).
    """
    def check(x):
      rows = x.shape[0]
      if rows % self.batch_shards:
        raise UserError(f"global batch of {rows} rows does not divide over the "
                        f"{self.batch_shards} devices of the batch axes "
                        f"{tuple(self.batch_sharding.spec)[0]}; use a multiple of "
                        f"{self.batch_shards}")
    jax.tree_util.tree_map(check, batch, is_leaf=lambda x: hasattr(x, "shape"))
    return sharding.global_batch(batch, self.mesh, self.batch_sharding.spec)

  # ---- Compiled calls ------------------------------------------------------------------------

  def jit_train_step(self, step_fn: Callable, state: train_step.TrainState, target_params: Any,
                     constants: Any, batch: Any, *, donate: bool = True) -> Callable:
    """``step_fn`` (``train_step.make_*_step``) jitted on the mesh.

    ``state``, ``target_params`` and ``constants`` are the placed values (or sharded abstract
    ones): their shardings become the ``in_shardings``, and the state keeps its shardings on
    the way out so that step n's output feeds step n+1 without a reshard. The state is donated
    (params and optimizer state are updated in place, no second copy): the caller must not
    touch a state after passing it in (``donate=False`` keeps it). ``batch`` only gives the
    structure: every leaf is split over the batch axes. Metrics come back replicated, so any
    host can read them. The returned function places host (numpy) batches itself, so it drops
    into ``trainer.run`` unchanged; it traces under the activation rules.
    """
    state_sh = _shardings_of(state, "state")
    in_sh = (state_sh, _shardings_of(target_params, "target_params"),
             _shardings_of(constants, "constants"),
             jax.tree_util.tree_map(lambda _: self.batch_sharding, batch))
    jitted = jax.jit(step_fn, in_shardings=in_sh, out_shardings=(state_sh, self.replicated),
                     donate_argnums=(0,) if donate else (),
                     compiler_options=self.compiler_options)

    def step(state, target_params, constants, batch):
      if not all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(batch)):
        batch = self.place_batch(batch)
      with self.activation_context():  # the rules are read while tracing
        return jitted(state, target_params, constants, batch)

    step.jitted = jitted  # for .lower(...) / cost analysis
    return step


def batch_structure(rows: int, seq_len: int) -> dict:
  """A stand-in for the input pipeline's batch (shapes only), to build a jitted step."""
  return {k: np.zeros((rows, seq_len), np.int32) for k in BATCH_KEYS}
