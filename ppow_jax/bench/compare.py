r"""Drafters side by side under a config's evaluation protocol (its eval stage, on any drafters).

  python -m ppow_jax.bench.compare --config=configs/default.py \
      --drafters=before=W1/drafters/baseline,after=W2/drafters/baseline \
      --config.eval.num_prompts=12 --config.eval.temperatures='(0.0,)'

The target is the config's (``target.hf_dir``: a Hugging Face directory, a GGUF file, or
``smollm2``); prompt sets (``eval.benchmarks``, or ``eval.prompts_file`` when that is empty), K,
temperatures, batch sizes, tree shape and new tokens are its ``eval`` settings. Every drafter
and AR decode the same prompts in the same interleaved timing runs, so τ, α̂ by position and
the speedups compare row against row (τ and α̂ do not depend on the machine's load; tokens/s
do). Prints ``report.md``'s table; ``--output_json`` keeps the rows.
"""

from __future__ import annotations

import os

from absl import flags

from ppow_jax import cli
from ppow_jax.errors import UserError

FLAGS = flags.FLAGS


def define_flags() -> None:
  cli.define_config_flag()
  flags.DEFINE_list("drafters", [], "NAME=DIR,...: exported drafters (EAGLE-3 or HF LM) to "
                    "evaluate side by side.")
  flags.DEFINE_string("output_json", None, "Write the rows (and the command) here.")


def parse_drafters(items: list[str]) -> dict[str, str]:
  """``["name=dir", ...]`` -> ``{name: dir}`` (names unique, not "ar", directories exist)."""
  named = {}
  for item in items:
    name, sep, path = item.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
      raise UserError(f"--drafters: {item!r} is not NAME=DIR")
    if name == "ar" or name in named:
      raise UserError(f"--drafters: the name {name!r} is "
                      f"{'reserved for AR' if name == 'ar' else 'given twice'}")
    if not os.path.isdir(path):
      raise UserError(f"--drafters: {name}={path}: no such directory")
    named[name] = path
  if not named:
    raise UserError("--drafters: give at least one NAME=DIR")
  return named


def run(argv: list[str]) -> dict:
  c = cli.config_from_flags()
  named = parse_drafters(FLAGS.drafters)
  if not c.target.hf_dir:
    raise UserError("config.target.hf_dir is empty: compare evaluates against a given target "
                    "(a Hugging Face directory, a GGUF file or 'smollm2')")
  if not c.eval.benchmarks.strip(", ") and not c.eval.prompts_file:
    raise UserError("config.eval.benchmarks and config.eval.prompts_file are both empty: "
                    "compare decodes benchmark prompt sets (e.g. humaneval,chat) or a file")
  # JAX starts here, after every argument is checked
  from ppow_jax import (datasets, drafters, evaluate, pretrain, report, settings,  # pylint: disable=g-import-not-at-top
                        timing)
  settings.validate(c)
  target_cfg, target_params = pretrain.given_target(c)
  tokenizer = datasets.given_tokenizer(c)  # the main job's: data.tokenizer, else the target's
  loaded = {name: drafters.load(path, target_cfg) for name, path in named.items()}
  sets = (datasets.benchmark_prompt_sets(c, tokenizer) if c.eval.benchmarks.strip(", ")
          else {os.path.basename(c.eval.prompts_file): datasets.file_prompts(c, tokenizer)})
  rows = evaluate.evaluate_sets(c, target_cfg, target_params, loaded, sets, tokenizer.eos_id)
  result = {"target": c.target.hf_dir, "drafters": named, "window": settings.eval_window(c),
            "max_new_tokens": c.eval.max_new_tokens, "machine": timing.machine_info(),
            "rows": rows}
  return cli.emit(result, "ppow_jax.bench.compare", report.table(rows), FLAGS.output_json)


if __name__ == "__main__":
  define_flags()
  cli.run_main(run)
