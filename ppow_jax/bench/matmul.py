r"""Few-row matrix products of a decode step: ``cpu_gemv``'s kernel vs XLA's dot, side by side.

  python -m ppow_jax.bench.matmul --rows=1,6,8,16,24

One jitted chain of ``matmul_t`` calls with a model's shapes (default: SmolLM2-135M's 30
layers of fused q/k/v, o, gate/up and down, then its tied 49,152-row head; 538 MB of f32
weights), each product's input taken from the previous one's output, run with the kernel and
with XLA's dot in alternating order (medians). Reports ms per chain and the
weight bytes streamed per second: a batch-1 decode step cannot be faster than this chain.
"""

from __future__ import annotations

import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax import cli, cpu_gemv, timing
from ppow_jax.errors import UserError

FLAGS = flags.FLAGS
_MAX_ROWS = 64  # the kernel takes any number of rows (8 per pass over the weights)


def define_flags() -> None:
  """This tool's flags (defined when it runs, so that importing it defines none)."""
  flags.DEFINE_list("rows", ["1", "6", "8", "16", "24"],
                    "Rows M per product (batch x new tokens); the kernel runs every one here.")
  flags.DEFINE_integer("hidden", 576, "E: the model's hidden size.")
  flags.DEFINE_integer("qkv", 960, "Rows of the fused q/k/v projection ((H + 2 KV) * D).")
  flags.DEFINE_integer("intermediate", 1536, "M of the MLP (gate/up has 2 M rows).")
  flags.DEFINE_integer("layers", 30, "Decoder layers.")
  flags.DEFINE_integer("vocab", 49152, "Rows of the head (0: none).")
  flags.DEFINE_integer("repeats", 20, "Timed chains per variant (after one compile run).")
  flags.DEFINE_string("output_json", None, "Write the numbers here.")


def chain_shapes(hidden: int, qkv: int, intermediate: int, layers: int,
                 vocab: int) -> list[tuple[int, int]]:
  """``[N, E]`` of every product of one decode step, in order."""
  layer = [(qkv, hidden), (hidden, hidden), (2 * intermediate, hidden), (hidden, intermediate)]
  return layer * layers + ([(vocab, hidden)] if vocab else [])


def _chain(ws: list[jax.Array], x_MxE: jax.Array) -> jax.Array:
  h = x_MxE
  for w in ws:  # the next input: this output cut or tiled to the next E (a data dependency)
    e = w.shape[1]
    reps = -(-e // h.shape[1])
    h = jnp.tanh(cpu_gemv.matmul_t(jnp.tile(h, (1, reps))[:, :e], w))
  return h


def measure(rows: list[int], shapes: list[tuple[int, int]], repeats: int) -> dict:
  if not cpu_gemv.available():
    raise UserError("the cpu_gemv kernel is unavailable here (see the warning above)")
  rng = np.random.default_rng(0)
  ws = [jax.device_put(rng.standard_normal(s, np.float32) * np.float32(0.02)) for s in shapes]
  gigabytes = sum(n * e for n, e in shapes) * 4 / 1e9
  out = {"rows": {}, "weights_gb": gigabytes, "products": len(shapes)}
  for m in rows:
    x = jnp.ones((m, shapes[0][1]), jnp.float32)
    fns = {}
    for name, high in (("kernel", _MAX_ROWS), ("xla", 0)):
      # a new function object per variant: jit caches traces by function, and the choice of
      # kernel or dot is made when tracing
      fn = jax.jit(lambda ws, x: _chain(ws, x))
      with cpu_gemv.rows_range(1, high):
        compiled = fn.lower(ws, x).compile()  # traced now, under this choice
      fns[name] = lambda c=compiled: jax.block_until_ready(c(ws, x))
    outputs = [np.asarray(f()) for f in fns.values()]
    if not np.allclose(outputs[0], outputs[1], rtol=1e-3, atol=1e-4):
      raise RuntimeError(f"rows={m}: the kernel's chain and XLA's differ by "
                         f"{np.abs(outputs[0] - outputs[1]).max()}")
    seconds = {k: [] for k in fns}
    for r in range(repeats):
      for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
        time.sleep(0.005)  # every timed chain starts from the same idle thread pool
        start = time.perf_counter()
        fns[name]()
        seconds[name].append(time.perf_counter() - start)
    med = {k: float(np.median(v)) for k, v in seconds.items()}
    res = {k: {"ms": 1e3 * med[k], "gb_per_s": gigabytes / med[k]} for k in fns}
    res["kernel_speedup"] = med["xla"] / med["kernel"]
    out["rows"][str(m)] = res
  out["machine"] = timing.machine_info()
  return out


def format_table(r: dict) -> str:
  lines = [f"{r['products']} products, {r['weights_gb'] * 1e3:.0f} MB of f32 weights per chain",
           "rows   kernel ms (GB/s)    XLA dot ms (GB/s)   kernel speed-up"]
  for m, x in r["rows"].items():
    k, d = x["kernel"], x["xla"]
    lines.append(f"{m:>4}   {k['ms']:8.2f} ({k['gb_per_s']:5.1f})    {d['ms']:8.2f} "
                 f"({d['gb_per_s']:5.1f})    {x['kernel_speedup']:.2f}x")
  return "\n".join(lines)


def run(argv) -> dict:
  rows = cli.int_list_flag("rows")
  for m in rows:
    if not 1 <= m <= _MAX_ROWS:
      raise UserError(f"--rows: {m} is outside 1..{_MAX_ROWS}")
  cli.require_positive("repeats", "hidden", "qkv", "intermediate", "layers")
  shapes = chain_shapes(FLAGS.hidden, FLAGS.qkv, FLAGS.intermediate, FLAGS.layers, FLAGS.vocab)
  result = measure(rows, shapes, FLAGS.repeats)
  return cli.emit(result, "ppow_jax.bench.matmul", format_table(result), FLAGS.output_json)


if __name__ == "__main__":
  define_flags()
  cli.run_main(run)
