r"""Where a decode step's time goes: the engine's compiled loop profiled op by op.

  python -m ppow_jax.bench.profile                                  # synthetic pair, AR, batch 1
  python -m ppow_jax.bench.profile --mode=spec --batch=8
  python -m ppow_jax.bench.profile --target=DIR --drafter=DIR       # e.g. SmolLM2 + a drafter
  python -m ppow_jax.bench.profile --attention=xla                  # XLA's attention ops instead

Runs ``Engine.generate`` under ``jax.profiler.trace`` (a Perfetto trace, ``--runs`` times after
a compile run) and names each of XLA's executed operations by its place in the model (the
``op_name`` of the compiled HLO, layer numbers folded: ``layers_L``); the CPU kernels' calls
are grouped as "matmul kernel" and "attention kernel". Reports microseconds per step (AR: per
token; speculative: per round) and calls per step, largest first. The profiler adds time to
every operation, so the shares, not the absolute times, are what this tool is for.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax import cli, cpu_attention, cpu_gemv, engine, gamma, timing
from ppow_jax.bench import pairs
from ppow_jax.errors import UserError

FLAGS = flags.FLAGS
_KERNELS = {cpu_gemv._TARGET: "matmul kernel", cpu_attention._TARGET: "attention kernel"}
# containers whose time is their children's (loops, conditionals, calls)
_CONTAINERS = ("while", "conditional", "call")


def define_flags() -> None:
  """This tool's flags (defined when it runs, so that importing it defines none)."""
  flags.DEFINE_enum("mode", "ar", ["ar", "spec"], "AR decoding or speculative decoding.")
  flags.DEFINE_integer("batch", 1, "Batch rows.")
  flags.DEFINE_integer("window", 5, "Draft window K (spec).")
  flags.DEFINE_integer("max_new_tokens", 128, "New tokens per row.")
  flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per row (random ids).")
  flags.DEFINE_integer("runs", 3, "Profiled generations (after one compile run).")
  flags.DEFINE_integer("top", 20, "Rows of the table.")
  flags.DEFINE_enum("attention", "kernel", ["kernel", "xla"],
                    "Decode attention by cpu_attention's kernel (where it applies) or XLA's ops.")
  flags.DEFINE_string("target", None, "A converted target (directory or GGUF name); default: "
                      "the synthetic pair of bench/pairs.py.")
  flags.DEFINE_string("drafter", None, "The drafter for --target (spec).")
  flags.DEFINE_string("output_json", None, "Write the numbers here.")


def op_names(hlo_text: str) -> dict[str, str]:
  """Instruction name -> what it is: a CPU kernel's group, else its op_name with the jit
  prefix dropped and layer numbers folded."""
  names = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?custom_call_target=\"([^\"]+)\"", line)
    if m and m.group(2) in _KERNELS:
      names[m.group(1)] = _KERNELS[m.group(2)]
      continue
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*op_name=\"([^\"]*)\"", line)
    if m:
      name = re.sub(r"layers_\d+", "layers_L", m.group(2))
      names[m.group(1)] = re.sub(r"^jit\([^)]*\)/", "", name)
  return names


def aggregate(events: list[dict], names: dict[str, str], steps: int) -> list[dict]:
  """Complete events ('X') of the named, non-container operations summed per name: µs and
  calls per step, largest first."""
  total, calls = collections.Counter(), collections.Counter()
  for e in events:
    name = e.get("name", "")
    if e.get("ph") != "X" or name not in names or name.startswith(_CONTAINERS):
      continue
    key = names[name]
    kind = re.sub(r"\.\d+$", "", name)
    if key not in _KERNELS.values():
      key = f"{key} [{kind}]"
    total[key] += float(e.get("dur", 0.0))
    calls[key] += 1
  return [{"op": k, "us_per_step": v / steps, "calls_per_step": calls[k] / steps}
          for k, v in total.most_common()]


def profile(target_cfg, target_params, drafter, draft_params, mode: str, batch: int,
            window: int, max_new_tokens: int, prompt_len: int, runs: int) -> dict:
  cfg = engine.DecodeConfig(window=window, max_new_tokens=max_new_tokens, eos_ids=())
  eng = engine.Engine(target_cfg, drafter if mode == "spec" else None, cfg)
  tp, dp = engine.decoding_pair(target_params, draft_params if mode == "spec" else None)
  prompts = jnp.asarray(gamma.random_prompts(target_cfg.vocab_size, batch, prompt_len, 0))
  lens = jnp.full((batch,), prompt_len, jnp.int32)
  rng = jax.random.PRNGKey(0)
  compiled = eng._fn(prompt_len).lower(tp, dp, prompts, lens, rng).compile()
  out = jax.block_until_ready(compiled(tp, dp, prompts, lens, rng))
  steps = int(np.asarray(out.stats.verify_calls_B).max())  # AR steps or speculative rounds
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      for _ in range(runs):
        jax.block_until_ready(compiled(tp, dp, prompts, lens, rng))
    traces = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)
    if not traces:
      raise RuntimeError(f"jax.profiler.trace wrote no Perfetto trace under {log_dir}")
    with gzip.open(max(traces, key=os.path.getmtime)) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  rows = aggregate(events, op_names(compiled.as_text()), steps * runs)
  return {"mode": mode, "batch": batch, "steps_per_run": steps, "runs": runs,
          "ops": rows, "us_per_step_listed": sum(r["us_per_step"] for r in rows)}


def format_table(r: dict, top: int) -> str:
  unit = "token" if r["mode"] == "ar" else "round"
  lines = [f"{r['mode']} at batch {r['batch']}: {r['steps_per_run']} {unit}s per run, "
           f"{r['runs']} runs profiled; {r['us_per_step_listed']:.1f} µs per {unit} in all "
           f"operations (the prompt pass's included), profiler overhead included",
           f"µs/{unit}  calls/{unit}  operation"]
  for x in r["ops"][:top]:
    lines.append(f"{x['us_per_step']:9.1f}  {x['calls_per_step']:8.1f}  {x['op'][:110]}")
  return "\n".join(lines)


def run(argv) -> dict:
  cli.require_positive("batch", "window", "max_new_tokens", "prompt_len", "runs", "top")
  if FLAGS.mode == "spec" and FLAGS.target and not FLAGS.drafter:
    raise UserError("--mode=spec with --target needs --drafter")
  p = (pairs.load_pair(FLAGS.target, FLAGS.drafter or "") if FLAGS.target
       else pairs.synthetic_pair())
  if FLAGS.attention == "xla":
    cpu_attention.MAX_ROWS = 0  # traced after this: XLA's ops everywhere
  result = profile(p.target_cfg, p.target_params, p.drafter, p.draft_params, FLAGS.mode,
                   FLAGS.batch, FLAGS.window, FLAGS.max_new_tokens, FLAGS.prompt_len, FLAGS.runs)
  result.update(attention=FLAGS.attention, machine=timing.machine_info())
  return cli.emit(result, "ppow_jax.bench.profile", format_table(result, FLAGS.top),
                  FLAGS.output_json)


if __name__ == "__main__":
  define_flags()
  cli.run_main(run)
