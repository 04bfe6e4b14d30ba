"""Meshes, logical-axis rules and shardings for the frozen target and the trained drafter.

Parallelism is decided by the config alone (``config.mesh``, ``config.sharding``):

* The mesh has axes ``("data", "fsdp", "tensor")``. ``mesh.ici_shape`` lays out the chips of
  one slice (or node), ``mesh.dcn_shape`` the slices (or nodes); the mesh is their
  element-wise product. One ``-1`` in either is filled from the device count.
* Parameters carry logical axes (``vocab, embed, mlp, heads, kv_heads, head_dim``, set by
  ``nn.with_logical_partitioning`` in the models). ``sharding.weight_rules`` map them to mesh
  axes: ``nn.get_partition_spec`` -> ``nn.logical_to_mesh_sharding``.
* Activations carry ``batch, length, embed, heads, head_dim, mlp, vocab``
  (``nn.with_logical_constraint``); ``sharding.activation_rules`` map them inside
  ``activation_context``. KV caches and input batches are placed by the same rules.
* The drafter's parameters follow the weight rules (``sharding.drafter_params="fsdp"``) or are
  copied to every device (``"replicated"``); its optimizer state mirrors its parameters.
  The target is frozen: it has no optimizer state and no gradients, only its bf16 weights.

A rule that names a logical axis twice, a mesh axis the mesh lacks, or a logical axis no model
uses is a ``UserError`` naming the rule: flax would otherwise silently keep the first match or
ignore it. Logical axes without a rule are replicated (flax's default).

Multi-host: call ``maybe_initialize_distributed()`` before anything else touches JAX; it only
calls ``jax.distributed.initialize()`` when ``PPOW_DISTRIBUTED=1`` (the launch scripts set it),
so a single host never waits for peers. Every host then holds the same global batch and
``global_batch`` copies each host's rows onto its devices.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import flax.linen as nn
import jax
from jax.experimental import mesh_utils, multihost_utils
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ppow_jax.errors import UserError
from ppow_jax.models import eagle3, kv_cache, llama

MeshAxis = Union[None, str, tuple]
Rules = tuple  # of (logical_name, MeshAxis)

# Logical names of activations (llama.py, eagle3.py) and of the KV cache (``CACHE_AXES``).
ACTIVATION_NAMES = ("batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab")
# Logical axes of one layer's keys (or values) in the KV cache; kv_cache.KVCache stores them
# with batch and kv_heads merged into one axis (the memory plan sizes them by these axes).
CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")
DRAFTER_PARAM_MODES = ("fsdp", "replicated")


# ---- Mesh ------------------------------------------------------------------------------------

def resolve_mesh_shapes(mesh_cfg, num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(ici_shape, dcn_shape) with the one ``-1`` filled so that their product is the device
  count. Pure arithmetic: the memory plan uses it without any devices."""
  axes = tuple(mesh_cfg.axes)
  ici, dcn = [int(x) for x in mesh_cfg.ici_shape], [int(x) for x in mesh_cfg.dcn_shape]
  for name, shape in (("mesh.ici_shape", ici), ("mesh.dcn_shape", dcn)):
    if len(shape) != len(axes):
      raise UserError(f"{name}={tuple(shape)} must have one entry per mesh axis {axes}")
    if any(x == 0 or x < -1 for x in shape):
      raise UserError(f"{name}={tuple(shape)}: entries must be positive or a single -1")
  holes = [(name, i) for name, shape in (("mesh.ici_shape", ici), ("mesh.dcn_shape", dcn))
           for i, x in enumerate(shape) if x == -1]
  if len(holes) > 1:
    raise UserError(f"mesh.ici_shape={tuple(ici)} and mesh.dcn_shape={tuple(dcn)}: at most "
                    f"one -1 is allowed")
  known = math.prod(x for x in ici + dcn if x != -1)
  if holes:
    if num_devices % known:
      raise UserError(f"mesh.ici_shape={tuple(ici)} x mesh.dcn_shape={tuple(dcn)}: {num_devices} "
                      f"devices are not a multiple of the fixed entries' product {known}")
    name, i = holes[0]
    (ici if name == "mesh.ici_shape" else dcn)[i] = num_devices // known
  elif known != num_devices:
    raise UserError(f"mesh.ici_shape={tuple(ici)} x mesh.dcn_shape={tuple(dcn)} has {known} "
                    f"devices but {num_devices} are available; fix mesh.ici_shape (a -1 "
                    f"fills one axis automatically)")
  return tuple(ici), tuple(dcn)


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """{axis: size} of the mesh ``make_mesh`` would build on ``num_devices`` devices."""
  ici, dcn = resolve_mesh_shapes(mesh_cfg, num_devices)
  return {a: i * d for a, i, d in zip(mesh_cfg.axes, ici, dcn)}


def device_grid(mesh_cfg, devices: Sequence[Any]) -> np.ndarray:
  """The devices arranged as the mesh: ICI-local axes within a slice, DCN across slices.

  Slices are TPU slices (``slice_index``); devices without it (GPUs) are grouped by process,
  i.e. by node.
  """
  ici, dcn = resolve_mesh_shapes(mesh_cfg, len(devices))
  try:
    if math.prod(dcn) == 1:
      return mesh_utils.create_device_mesh(ici, devices)
    return mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=not hasattr(devices[0], "slice_index"))
  except (ValueError, AssertionError, NotImplementedError) as e:
    raise UserError(f"mesh.ici_shape={ici}, mesh.dcn_shape={dcn} do not fit the "
                    f"{len(devices)} devices: {e}") from None


def make_mesh(mesh_cfg, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """The ``jax.sharding.Mesh`` of ``config.mesh`` over ``devices`` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(device_grid(mesh_cfg, devices), tuple(mesh_cfg.axes))


# ---- Rules -----------------------------------------------------------------------------------

def _mesh_axes_of(value: MeshAxis) -> tuple[str, ...]:
  if value is None:
    return ()
  return (value,) if isinstance(value, str) else tuple(value)


def num_shards(entry: MeshAxis, axis_sizes: dict[str, int]) -> int:
  """Shards of one PartitionSpec entry (None, an axis or a tuple of axes) on the mesh."""
  return math.prod(axis_sizes[a] for a in _mesh_axes_of(entry))


def validate_rules(rules: Sequence, mesh_axes: Sequence[str], known_logical_names,
                   where: str) -> Rules:
  """Checks ``rules`` and returns them as a tuple of ``(name, axis | tuple | None)``.

  Raises UserError naming the rule (``where[i]``) for: a malformed rule, a logical name mapped
  twice (flax would silently keep the first), a mesh axis the mesh lacks (or repeated), and a
  logical name no model uses (usually a typo that leaves something replicated).
  """
  known = set(known_logical_names)
  seen: dict[str, int] = {}
  out = []
  for i, rule in enumerate(rules):
    label = f"{where}[{i}]={tuple(rule) if isinstance(rule, (list, tuple)) else rule!r}"
    if not isinstance(rule, (list, tuple)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise UserError(f"{label}: a rule is (logical_name, mesh_axis | tuple of axes | None)")
    name, value = rule[0], rule[1]
    if isinstance(value, list):
      value = tuple(value)
    axes = _mesh_axes_of(value)
    if not all(isinstance(a, str) for a in axes):
      raise UserError(f"{label}: mesh axes must be strings or None")
    if name in seen:
      raise UserError(f"{label} conflicts with {where}[{seen[name]}]: logical axis {name!r} "
                      f"is mapped twice")
    unknown = [a for a in axes if a not in mesh_axes]
    if unknown:
      raise UserError(f"{label}: mesh axis {unknown[0]!r} is not in the mesh "
                      f"{tuple(mesh_axes)}")
    if len(set(axes)) != len(axes):
      raise UserError(f"{label}: a mesh axis is repeated")
    if name not in known:
      raise UserError(f"{label} is unused: no model has a logical axis {name!r} (known: "
                      f"{', '.join(sorted(known))})")
    seen[name] = i
    out.append((name, value))
  return tuple(out)


def logical_names(abstract_boxed: Any) -> set[str]:
  """Every logical axis name used by the boxed (``nn.Partitioned``) parameters."""
  specs = jax.tree_util.tree_leaves(nn.get_partition_spec(abstract_boxed),
                                    is_leaf=lambda x: isinstance(x, P))
  return {name for spec in specs for name in spec if isinstance(name, str)}


def rules_from_config(config, param_names: Sequence[str]) -> tuple[Rules, Rules]:
  """(weight_rules, activation_rules) of ``config.sharding``, validated against the mesh axes
  and the logical names the models use (``param_names``: see ``logical_names``)."""
  axes = tuple(config.mesh.axes)
  if config.sharding.drafter_params not in DRAFTER_PARAM_MODES:
    raise UserError(f"sharding.drafter_params must be one of {DRAFTER_PARAM_MODES}, got "
                    f"{config.sharding.drafter_params!r}")
  weight = validate_rules(config.sharding.weight_rules, axes, param_names,
                          "sharding.weight_rules")
  act = validate_rules(config.sharding.activation_rules, axes, ACTIVATION_NAMES,
                       "sharding.activation_rules")
  return weight, act


def mesh_specs(abstract_boxed: Any, rules: Optional[Rules]) -> Any:
  """Tree of mesh ``PartitionSpec`` s (no mesh needed), from the boxed params' logical axes;
  ``rules=None``: every array replicated."""
  if rules is None:
    return jax.tree_util.tree_map(lambda _: P(), nn.unbox(abstract_boxed))
  return nn.logical_to_mesh(nn.get_partition_spec(abstract_boxed), rules)


def spec_for(logical_axes: Sequence[Optional[str]], rules: Rules) -> P:
  """Mesh PartitionSpec of an array with the given logical axes (e.g. a batch or a cache)."""
  return nn.logical_to_mesh_axes(tuple(logical_axes), rules)


# ---- Parameters ------------------------------------------------------------------------------

def init_fn(model_cfg: Union[llama.ModelConfig, eagle3.Eagle3Config]) -> Callable:
  """rng -> boxed params of the target/LM drafter (ModelConfig) or EAGLE-3 drafter."""
  dt = llama.to_dtype(model_cfg.dtype)
  if isinstance(model_cfg, eagle3.Eagle3Config):
    model = eagle3.Eagle3Drafter(model_cfg)
    e, et = model_cfg.hidden_size, model_cfg.target_hidden_size
    return lambda rng: model.init(rng, jnp.zeros((1, 2, e), dt),
                                  [jnp.zeros((1, 2, et), dt)] * 3)["params"]
  model = llama.Decoder(model_cfg)
  return lambda rng: model.init(rng, jnp.zeros((1, 2), jnp.int32))["params"]


def abstract_params(model_cfg) -> Any:
  """Boxed ``ShapeDtypeStruct`` params via ``jax.eval_shape``: nothing is allocated."""
  init = init_fn(model_cfg)
  return jax.eval_shape(lambda: init(jax.random.key(0)))  # the key is traced too


def to_named(specs: Any, mesh: Mesh) -> Any:
  """Tree of PartitionSpecs -> tree of NamedShardings on ``mesh``."""
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                is_leaf=lambda x: isinstance(x, P))


def shard_params(params: Any, shardings: Any) -> Any:
  """Places existing (e.g. loaded) parameters on the mesh."""
  return jax.device_put(nn.unbox(params), shardings)


def bytes_per_device(shape: Sequence[int], dtype, spec: P, axis_sizes: dict[str, int]) -> int:
  """Bytes of the largest shard of an array with mesh ``spec`` on a mesh of ``axis_sizes``
  (each dim split into ceil(dim / prod of its axes' sizes))."""
  local = list(shape)
  for i, entry in enumerate(tuple(spec)[:len(local)]):
    local[i] = -(-local[i] // num_shards(entry, axis_sizes))
  return math.prod(local) * np.dtype(dtype).itemsize


def check_divisible(abstract: Any, specs: Any, axis_sizes: dict[str, int], what: str) -> None:
  """UserError naming the first parameter whose sharded dim does not divide evenly (jit and
  device_put refuse such shardings)."""
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract))[0]
  spec_leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
  for (path, x), spec in zip(flat, spec_leaves):
    for dim, entry in zip(x.shape, tuple(spec)):
      shards = num_shards(entry, axis_sizes)
      if dim % shards:
        raise UserError(f"{what} {jax.tree_util.keystr(path)} {tuple(x.shape)}: dim {dim} is "
                        f"split over {entry} ({shards} shards) and does not divide; change "
                        f"the mesh or the sharding rules")


# ---- Batches, caches, activations ------------------------------------------------------------

def batch_spec(rules: Rules, ndim: int = 2) -> P:
  """PartitionSpec of a batch-major array [B, ...]: rows split per the ``batch`` rule."""
  return spec_for(("batch",) + (None,) * (ndim - 1), rules)


def global_batch(batch: Any, mesh: Mesh, spec: P) -> Any:
  """Global arrays, split per ``spec``, from the whole batch that every process holds (numpy
  arrays, or anything with ``shape``, ``dtype`` and numpy indexing, e.g. rows of a memory-mapped
  file): each process reads only the rows of its own devices, wherever the mesh puts them."""
  sharding = NamedSharding(mesh, spec)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_callback(tuple(x.shape), sharding,
                                             lambda index: np.asarray(x[index])),
      batch, is_leaf=lambda x: hasattr(x, "shape"))


@contextlib.contextmanager
def activation_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Inside, the models' ``nn.with_logical_constraint`` calls shard activations per ``rules``
  on ``mesh`` (outside any mesh they are no-ops)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


# ---- Processes -------------------------------------------------------------------------------

def maybe_initialize_distributed() -> bool:
  """Joins the multi-host job when ``PPOW_DISTRIBUTED=1`` (set by the launch scripts).

  ``jax.distributed.initialize()`` auto-detects TPU pods and SLURM; elsewhere (several
  processes on one machine, ``launch/local_multiprocess.sh``) the process count and this
  process's id come from ``PPOW_NUM_PROCESSES`` and ``PPOW_PROCESS_ID``, the coordinator from
  JAX's own ``JAX_COORDINATOR_ADDRESS``. CPU devices of different processes talk through gloo.
  Never calling it otherwise keeps single-host runs from waiting for a coordinator. Returns
  whether it was called.
  """
  if os.environ.get("PPOW_DISTRIBUTED", "0") != "1":
    return False
  given = {key: os.environ.get(name, "") for key, name in (
      ("num_processes", "PPOW_NUM_PROCESSES"), ("process_id", "PPOW_PROCESS_ID"))}
  if any(given.values()) and not all(v.isdigit() for v in given.values()):
    raise UserError(f"PPOW_NUM_PROCESSES={given['num_processes']!r} and PPOW_PROCESS_ID="
                    f"{given['process_id']!r}: set both, as integers (or neither)")
  kwargs = {k: int(v) for k, v in given.items() if v}
  if kwargs and not 0 <= kwargs["process_id"] < kwargs["num_processes"]:
    raise UserError(f"PPOW_PROCESS_ID={kwargs['process_id']} is not in [0, "
                    f"PPOW_NUM_PROCESSES={kwargs['num_processes']})")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  return True


def is_multiprocess() -> bool:
  return jax.process_count() > 1


def sync(name: str) -> None:
  """Every process waits here until all have arrived (a no-op on one process)."""
  if is_multiprocess():
    multihost_utils.sync_global_devices(name)


def stop_requested(step: int, signalled: bool) -> bool:
  """Whether to save and stop after training step ``step``. One process: whether it got
  SIGTERM (``signalled``). Several: JAX's preemption service (it catches SIGTERM) answers
  True on every process at the same step once any of them got it; call it every step."""
  if not is_multiprocess():
    return signalled
  return multihost_utils.reached_preemption_sync_point(step)


def broadcast_from_primary(value: float) -> float:
  """Process 0's ``value`` on every process (e.g. a timing, which differs between them)."""
  if not is_multiprocess():
    return value
  return float(multihost_utils.broadcast_one_to_all(np.float64(value)))


def strided_sample(x: Any, stride: int = 997) -> np.ndarray:
  """``ravel(x)[::stride]`` as numpy, the same on every process: an array split over other
  processes' devices is sampled where it lives (a gather of the few elements), never copied
  whole (a target's weights fingerprint the caches derived from it)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
    return np.ascontiguousarray(np.asarray(x).ravel()[::stride])
  index = np.unravel_index(np.arange(0, x.size, stride), x.shape)
  return np.ascontiguousarray(to_host(jax.jit(lambda a: a[index])(x)))


@contextlib.contextmanager
def primary_first(name: str) -> Iterator[None]:
  """Process 0 runs the block first (it writes a shared file: a tokenizer, a cache); the
  others run it once process 0 is done, and find what it wrote."""
  if not is_primary():
    sync(name)
  yield
  if is_primary():
    sync(name)


def to_host(tree: Any) -> Any:
  """numpy copies of every leaf on every process, whole, also when an array is split over
  devices of other processes (then all processes must call this together)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  split = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)
           and not (x.is_fully_addressable or x.is_fully_replicated)]
  out = [None if i in split else np.asarray(x) for i, x in enumerate(leaves)]
  if split:  # one gather for all of them
    gathered = multihost_utils.process_allgather([leaves[i] for i in split], tiled=True)
    for i, x in zip(split, gathered):
      out[i] = np.asarray(x)
  return jax.tree_util.tree_unflatten(treedef, out)


def is_primary() -> bool:
  """True on the one process that writes logs, summaries and exports."""
  return jax.process_index() == 0
