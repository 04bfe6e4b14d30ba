r"""Decode attention against a KV cache: ``cpu_attention``'s kernel vs XLA's ops, side by side.

  python -m ppow_jax.bench.attention --batch_sizes=1,8 --tokens=1,6           # synthetic pair
  python -m ppow_jax.bench.attention --heads=9 --kv_heads=3 --head_dim=64      # SmolLM2-135M

One jitted loop of ``--calls`` steps; each step attends once per layer (``--layers`` caches of
``--slots`` slots, ``--visible`` of them seen by the first new token, the causal mask after
it) and feeds the output back as the next query. Both variants run in alternating order;
reports microseconds per attention call (medians).
"""

from __future__ import annotations

import itertools
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax import cli, cpu_attention, timing
from ppow_jax.errors import UserError

FLAGS = flags.FLAGS


def define_flags() -> None:
  """This tool's flags (defined when it runs, so that importing it defines none)."""
  flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch rows B.")
  flags.DEFINE_list("tokens", ["1", "6"], "New tokens T per row (1: an AR step; K + 1: a "
                    "verification).")
  flags.DEFINE_integer("heads", 8, "Query heads H.")
  flags.DEFINE_integer("kv_heads", 4, "KV heads (dividing --heads).")
  flags.DEFINE_integer("head_dim", 32, "D.")
  flags.DEFINE_integer("slots", 199, "Cache slots S.")
  flags.DEFINE_integer("visible", 128, "Slots the first new token sees.")
  flags.DEFINE_integer("layers", 8, "Caches attended in turn per step (one per layer).")
  flags.DEFINE_integer("calls", 50, "Steps per timed loop.")
  flags.DEFINE_integer("repeats", 7, "Timed loops per variant (after one compile run).")
  flags.DEFINE_string("output_json", None, "Write the numbers here.")


def _loop(attend, calls: int, scale: float):
  def step(q_BxTxHxD, ks, vs, mask_BxTxS):
    for k, v in zip(ks, vs):  # one attention per layer, each reading its own cache
      q_BxTxHxD = jnp.tanh(attend(q_BxTxHxD, k, v, mask_BxTxS, scale))
    return q_BxTxHxD
  return jax.jit(lambda q, ks, vs, mask: jax.lax.fori_loop(
      0, calls, lambda i, q: step(q, ks, vs, mask), q))


def measure(batch: int, tokens: int, heads: int, kv_heads: int, head_dim: int, slots: int,
            visible: int, layers: int, calls: int, repeats: int) -> dict:
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((batch, tokens, heads, head_dim), np.float32))
  ks, vs = ([jnp.asarray(rng.standard_normal((batch * kv_heads, slots, head_dim), np.float32))
             for _ in range(layers)] for _ in range(2))
  mask = jnp.asarray(np.broadcast_to(
      np.arange(slots)[None, :] < visible + np.arange(tokens)[:, None], (batch, tokens, slots)))
  scale = 1.0 / np.sqrt(head_dim)
  fns = {}
  for name, fn in (("kernel", cpu_attention.attend), ("xla", cpu_attention.reference)):
    compiled = _loop(fn, calls, scale).lower(q, ks, vs, mask).compile()
    fns[name] = lambda c=compiled: jax.block_until_ready(c(q, ks, vs, mask))
  outputs = [np.asarray(f()) for f in fns.values()]
  if not np.allclose(outputs[0], outputs[1], rtol=1e-3, atol=1e-4):
    raise RuntimeError(f"batch {batch}, tokens {tokens}: the kernel and XLA's ops differ by "
                       f"{np.abs(outputs[0] - outputs[1]).max()}")
  seconds = {k: [] for k in fns}
  for r in range(repeats):
    for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
      start = time.perf_counter()
      fns[name]()
      seconds[name].append(time.perf_counter() - start)
  us = {k: 1e6 * float(np.median(v)) / (calls * layers) for k, v in seconds.items()}
  return {"batch": batch, "tokens": tokens, "kernel_us": us["kernel"], "xla_us": us["xla"],
          "kernel_speedup": us["xla"] / us["kernel"],
          "rows_per_kv_head": tokens * heads // kv_heads}


def format_table(r: dict) -> str:
  s = r["shape"]
  lines = [f"H {s['heads']} / KV {s['kv_heads']}, D {s['head_dim']}, {s['slots']} slots "
           f"({s['visible']} seen), {s['layers']} caches",
           "batch  tokens  rows/KV head  kernel µs  XLA µs  kernel speed-up"]
  for x in r["cases"]:
    lines.append(f"{x['batch']:>5}  {x['tokens']:>6}  {x['rows_per_kv_head']:>12}  "
                 f"{x['kernel_us']:9.2f}  {x['xla_us']:6.2f}  {x['kernel_speedup']:.2f}x")
  return "\n".join(lines)


def run(argv) -> dict:
  lists = {}
  for name in ("batch_sizes", "tokens"):
    lists[name] = cli.int_list_flag(name)
    if min(lists[name]) < 1:
      raise UserError(f"--{name}: every value must be >= 1, got {min(lists[name])}")
  cli.require_positive("heads", "kv_heads", "head_dim", "slots", "layers", "calls", "repeats")
  if FLAGS.heads % FLAGS.kv_heads:
    raise UserError(f"--kv_heads={FLAGS.kv_heads} must divide --heads={FLAGS.heads}")
  if not 1 <= FLAGS.visible <= FLAGS.slots - max(lists["tokens"]) + 1:
    raise UserError(f"--visible={FLAGS.visible} must be in 1..--slots - tokens + 1 = "
                    f"{FLAGS.slots - max(lists['tokens']) + 1}")
  rows = max(lists["tokens"]) * FLAGS.heads // FLAGS.kv_heads
  if not cpu_attention.applies(rows, jnp.float32):
    raise UserError(f"the attention kernel does not apply here: unavailable (see the warning "
                    f"above), or {rows} rows per KV head > {cpu_attention.MAX_ROWS}")
  shape = {k: getattr(FLAGS, k) for k in ("heads", "kv_heads", "head_dim", "slots", "visible",
                                           "layers")}
  cases = [measure(b, t, **shape, calls=FLAGS.calls, repeats=FLAGS.repeats)
           for b, t in itertools.product(lists["batch_sizes"], lists["tokens"])]
  result = {"shape": shape, "cases": cases, "calls": FLAGS.calls, "repeats": FLAGS.repeats,
            "machine": timing.machine_info()}
  return cli.emit(result, "ppow_jax.bench.attention", format_table(result), FLAGS.output_json)


if __name__ == "__main__":
  define_flags()
  cli.run_main(run)
