r"""Our engine against llama.cpp's EAGLE-3 path: the same target weights, drafter and prompts.

  export PPOW_LLAMACPP_DIR=$(bash launch/build_llamacpp.sh ~/.cache/ppow_jax/llamacpp)
  python -m ppow_jax.bench.serve_check --target=TARGET_HF_DIR \
      --target_gguf=SmolLM2-135M-Instruct.Q4_1.gguf --drafter=EXPORTED_EAGLE3_DIR \
      --window=5 --max_new_tokens=64 --num_prompts=8 --output_json=/tmp/serve_check.json

A drafter exported here is only useful if serving engines read it as we do: a wrong fusion
order, draft-vocabulary map, norm placement or RoPE layout loads without complaint and then
drafts garbage. This runs llama.cpp's ``llama-speculative-simple --spec-type draft-eagle3`` on
our export (converted by llama.cpp's own ``convert_hf_to_gguf.py --target-model-dir``) and our
engine on the same prompts, greedy, batch 1, same window K, and reports for both: acceptance
per drafted token (accepted ÷ drafted), τ (committed tokens per target call, the bonus token
included; docs/protocol.md), tokens/s, and whether each greedy text equals the target's own
greedy output (our AR decoding; llama.cpp may run up to K tokens past ``max_new_tokens``, so
its text must *start with* the reference).

Target weights: ``--target_gguf`` (e.g. a quantized GGUF) becomes an f32 GGUF with
``llama-quantize --allow-requantize ... F32``, and ``--target`` must hold the same weights in
the Hugging Face layout (our engine reads it; the converter takes the drafter's tokenizer and
target config from it). Without ``--target_gguf`` the HF directory itself is converted to f32.
Converted files are cached by content stamp under ``--cache_dir``, outside the repository.

Prompts: ``--prompts_file`` (JSONL, docs/protocol.md) or built-in questions, rendered with the
target's chat template when it has one; llama.cpp tokenizes the same text itself, and the run
stops with an error when its echo of the prompt differs from ours (different prompt ids).
Flags: ``--help``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import re
import subprocess
import time
from typing import Optional

from absl import app, flags
import jax

from ppow_jax import cli, drafters, engine, timing
from ppow_jax.bench import peers
from ppow_jax.data import prompts as prompts_lib
from ppow_jax.data import tokenizer as tokenizer_lib
from ppow_jax.errors import UserError
from ppow_jax.models import hf

FLAGS = flags.FLAGS


def define_flags() -> None:
  """This tool's flags (defined when it runs, so that importing it defines none)."""
  flags.DEFINE_string("target", None, "Target: a Hugging Face model directory (our engine reads "
                      "it; the converter takes the tokenizer and config from it).")
  flags.DEFINE_string("drafter", None, "EAGLE-3 drafter directory exported by this project.")
  flags.DEFINE_integer("window", 5, "K: draft tokens per verification, in both engines.")
  flags.DEFINE_integer("max_new_tokens", 64, "New tokens per prompt.")
  flags.DEFINE_integer("threads", 0, "CPU threads for llama.cpp (0: all cores).")
  flags.DEFINE_string("output_json", None, "Write the result here as JSON.")
  flags.DEFINE_string("llamacpp_dir", None, "llama.cpp built by launch/build_llamacpp.sh "
                      "(default: $PPOW_LLAMACPP_DIR).")
  flags.DEFINE_string("target_gguf", None, "GGUF of the target (any type; made f32 with "
                      "llama-quantize). Default: convert --target to f32.")
  flags.DEFINE_string("prompts_file", None, "JSONL prompts (prompt / conversations / messages).")
  flags.DEFINE_integer("num_prompts", 8, "Prompts used (the first N).")
  flags.DEFINE_string("cache_dir", None, "Converted GGUFs (default ~/.cache/ppow_jax/serve_check).")


ENV_DIR = "PPOW_LLAMACPP_DIR"
BUILD_HINT = "build it with: bash launch/build_llamacpp.sh DIR, then pass DIR"
DEFAULT_QUESTIONS = (
    "What is the capital of France?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "How many days are there in a leap year, and why?",
    "Translate 'good morning' into Spanish and German.",
    "What does a compiler do?",
    "Give me a short recipe for pancakes.",
)
# Token texts llama.cpp treats as end of generation; ours stops at the same ids.
_EOG_TEXTS = ("</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>",
              "<|eom_id|>", "<end_of_turn>", "<|end|>")


@dataclasses.dataclass(frozen=True)
class LlamaCpp:
  root: str  # the source tree: convert_hf_to_gguf.py, gguf-py/, build/bin/

  def tool(self, name: str) -> str:
    return os.path.join(self.root, "build", "bin", name)


def find_llamacpp(directory: Optional[str] = None) -> LlamaCpp:
  """The llama.cpp build in ``directory`` (or $PPOW_LLAMACPP_DIR), checked for what we run."""
  directory = directory or os.environ.get(ENV_DIR)
  if not directory:
    raise UserError(f"no llama.cpp: pass --llamacpp_dir or set {ENV_DIR}; {BUILD_HINT}")
  lc = LlamaCpp(os.path.abspath(os.path.expanduser(directory)))
  needed = [lc.tool("llama-speculative-simple"), lc.tool("llama-quantize"),
            os.path.join(lc.root, "convert_hf_to_gguf.py")]
  missing = [p for p in needed if not os.path.isfile(p)]
  if missing:
    raise UserError(f"llama.cpp at {lc.root} lacks {', '.join(missing)}; {BUILD_HINT}")
  return lc


def content_stamp(*paths: str) -> str:
  """A short key of files' (path, size, mtime): cached conversions follow their inputs."""
  h = hashlib.sha1()
  for p in paths:
    st = os.stat(p)
    h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
  return h.hexdigest()[:12]


def _weights(hf_dir: str) -> list[str]:
  names = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
  if not names:
    raise UserError(f"{hf_dir}: no .safetensors weights")
  return [os.path.join(hf_dir, f) for f in ["config.json"] + names]


def _cached(out: str, make) -> str:
  """``out`` if it exists, else ``make(tmp)`` then rename: a failed run leaves nothing."""
  if os.path.isfile(out):
    return out
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = f"{out}.tmp{os.getpid()}"
  try:
    make(tmp)
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return out


def target_gguf_f32(lc: LlamaCpp, cache_dir: str, target_dir: str,
                    target_gguf: Optional[str] = None) -> str:
  """The f32 GGUF llama.cpp runs: requantized from ``target_gguf``, else converted from HF."""
  if target_gguf:
    if not os.path.isfile(target_gguf):
      raise UserError(f"--target_gguf: {target_gguf} not found")

    def make(tmp):
      proc = subprocess.run([lc.tool("llama-quantize"), "--allow-requantize", target_gguf, tmp,
                             "F32"], capture_output=True, text=True)
      if proc.returncode != 0:
        raise UserError(f"llama-quantize failed on {target_gguf}:\n{proc.stderr[-2000:]}")

    name = f"{os.path.basename(target_gguf)[:-5]}-{content_stamp(target_gguf)}-f32.gguf"
    return _cached(os.path.join(cache_dir, name), make)
  out = os.path.join(cache_dir, f"target-{content_stamp(*_weights(target_dir))}-f32.gguf")
  return _cached(out, lambda tmp: peers.convert_to_gguf(lc.root, target_dir, tmp))


def drafter_gguf(lc: LlamaCpp, cache_dir: str, drafter_dir: str, target_dir: str) -> str:
  """Our EAGLE-3 export converted by llama.cpp's converter, as a serving user would."""
  stamp = content_stamp(*_weights(drafter_dir), os.path.join(target_dir, "config.json"))
  return _cached(os.path.join(cache_dir, f"drafter-{stamp}-f32.gguf"),
                 lambda tmp: peers.convert_to_gguf(
                     lc.root, drafter_dir, tmp, ("--target-model-dir", target_dir)))


def gguf_special_ids(path: str) -> tuple[bool, Optional[int], tuple[int, ...]]:
  """(adds BOS, BOS id, end-of-generation ids) as llama.cpp reads them from the GGUF."""
  import gguf  # pylint: disable=g-import-not-at-top

  fields = gguf.GGUFReader(path).fields

  def scalar(key):
    f = fields.get(key)
    return None if f is None else f.parts[f.data[0]].tolist()[0]

  eog = {scalar(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")} - {None}
  return bool(scalar("tokenizer.ggml.add_bos_token")), scalar("tokenizer.ggml.bos_token_id"), (
      tuple(sorted(int(i) for i in eog)))


@dataclasses.dataclass(frozen=True)
class Prompt:
  text: str  # what llama.cpp tokenizes (special tokens parsed)
  ids: list  # what our engine decodes from: the same tokens


def build_prompts(info: tokenizer_lib.TokenizerInfo, add_bos: bool, bos_id: Optional[int],
                  prompts_file: Optional[str], num: int) -> list[Prompt]:
  """Prompt texts (chat template applied when the target has one) and their ids."""
  if prompts_file:
    convs = prompts_lib.read_prompts(prompts_file)[:num]
  else:
    convs = [[("user", q)] for q in DEFAULT_QUESTIONS[:num]]
  if not convs:
    raise UserError(f"no prompts (--prompts_file={prompts_file}, --num_prompts={num})")
  out = []
  for turns in convs:
    if info.chat_template is not None:
      text = tokenizer_lib.render_chat_template(turns, info, add_generation_prompt=True)
    else:
      text = "\n".join(content for _, content in turns)
    ids = info.tokenizer.encode(text, add_special_tokens=False).ids
    out.append(Prompt(text, ([bos_id] if add_bos and bos_id is not None else []) + ids))
  return out


def parse_speculative_log(stdout: str, stderr: str, echo: str) -> dict:
  """Counts, timings and the generated text from ``llama-speculative-simple``'s output.

  Its stdout is "\\n\\n", the prompt's pieces, the generated pieces, "\\n\\n" (then "\\n\\n" at
  exit); the statistics are log lines on stderr.
  """
  log = stdout + stderr

  def grab(pattern: str, cast=float):
    m = re.search(pattern, log)
    if m is None:
      raise UserError(f"llama-speculative-simple: no {pattern!r} in its output:\n{log[-2000:]}")
    return cast(m.group(1))

  body = stdout[2:] if stdout.startswith("\n\n") else stdout
  if not body.startswith(echo):
    raise UserError("llama.cpp tokenized the prompt differently from ours: it echoed\n"
                    f"{body[:len(echo) + 40]!r}\ninstead of\n{echo!r}")
  text = body[len(echo):]
  for tail in ("\n\n\n\n", "\n\n"):
    if text.endswith(tail):
      text = text[:-len(tail)]
      break
  n_predict, n_accept = grab(r"n_predict\s*=\s*(\d+)", int), grab(r"n_accept\s*=\s*(\d+)", int)
  return {"text": text, "n_predict": n_predict, "n_drafted": grab(r"n_drafted\s*=\s*(\d+)", int),
          "n_accept": n_accept, "rounds": n_predict - n_accept,
          "encode_s": grab(r"encoded\s+\d+ tokens in\s+([\d.]+) seconds"),
          "decode_s": grab(r"decoded\s+\d+ tokens in\s+([\d.]+) seconds")}


def run_llamacpp(lc: LlamaCpp, target: str, drafter: str, prompt: Prompt, echo: str,
                 window: int, max_new: int, threads: int) -> dict:
  ctx = len(prompt.ids) + max_new + 2 * window + 16
  cmd = [lc.tool("llama-speculative-simple"), "-m", target, "-md", drafter, "-p", prompt.text,
         "-n", str(max_new), "--spec-type", "draft-eagle3", "--spec-draft-n-max", str(window),
         "--spec-draft-n-min", "0", "--spec-draft-p-min", "0", "--temp", "0", "--top-k", "1",
         "-t", str(threads), "-td", str(threads), "-c", str(ctx), "--seed", "0"]
  for _ in range(3):  # its asynchronous logger sometimes drops the last lines at exit
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
      raise UserError(f"llama-speculative-simple failed:\n{proc.stderr[-3000:]}")
    if re.search(r"n_accept\s*=", proc.stderr + proc.stdout):
      break
  return {**parse_speculative_log(proc.stdout, proc.stderr, echo), "wall_s": wall}


def _decode_timed(eng: engine.Engine, tparams, dparams, ids: list, compiled: set):
  """(new tokens, stats, seconds) of one prompt; compiles first on a new padded length."""
  prompts, lens = engine.pad_prompts([ids])
  rng = jax.random.PRNGKey(0)
  if prompts.shape not in compiled:
    jax.block_until_ready(eng.generate(tparams, dparams, prompts, lens, rng))
    compiled.add(prompts.shape)
  t0 = time.perf_counter()
  out = jax.block_until_ready(eng.generate(tparams, dparams, prompts, lens, rng))
  return out.new_tokens()[0], out.stats, time.perf_counter() - t0


def continuation_text(info: tokenizer_lib.TokenizerInfo, prompt_ids: list, new_ids: list,
                      echo: str, eos: tuple) -> str:
  """The new tokens as llama.cpp prints them: pieces after the prompt's, no final EOS."""
  new_ids = list(new_ids[:-1] if new_ids and new_ids[-1] in eos else new_ids)
  full = info.decode(list(prompt_ids) + new_ids, skip_special_tokens=False)
  if full.startswith(echo):  # decoding in context keeps a leading space a decoder would strip
    return full[len(echo):]
  return info.decode(new_ids, skip_special_tokens=False)


def _rate(num: float, den: float) -> float:
  return float(num) / den if den else 0.0


def run_check(lc: LlamaCpp, target_dir: str, drafter_dir: str, *, window: int = 5,
              max_new: int = 64, target_gguf: Optional[str] = None,
              prompts_file: Optional[str] = None, num_prompts: int = 8,
              cache_dir: Optional[str] = None, threads: int = 0) -> dict:
  """Both engines on the same prompts; the per-prompt records and the totals, as a dict."""
  cache_dir = os.path.expanduser(cache_dir or "~/.cache/ppow_jax/serve_check")
  threads = threads or os.cpu_count() or 1
  with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two converter processes at once
    tgt = pool.submit(target_gguf_f32, lc, cache_dir, target_dir, target_gguf)
    dft = pool.submit(drafter_gguf, lc, cache_dir, drafter_dir, target_dir)
    tgt_gguf, dft_gguf = tgt.result(), dft.result()
  add_bos, bos_id, eog = gguf_special_ids(tgt_gguf)
  info = tokenizer_lib.load(target_dir)
  vocab = info.tokenizer.get_vocab()
  eos = tuple(sorted(set(eog) | set(hf.read_generation_info(target_dir).eos_token_ids)
                     | {vocab[t] for t in _EOG_TEXTS if t in vocab}))
  prompts = build_prompts(info, add_bos, bos_id, prompts_file, num_prompts)

  target, tparams = hf.load(target_dir)
  drafter, dparams = drafters.load(drafter_dir, target.cfg)
  if not isinstance(drafter, drafters.Eagle3FeatureDrafter):
    raise UserError(f"--drafter {drafter_dir}: not an EAGLE-3 export (llama.cpp's draft-eagle3 "
                    "path needs one)")
  tparams, dparams = engine.decoding_pair(tparams, dparams)
  dcfg = engine.DecodeConfig(window=window, max_new_tokens=max_new, eos_ids=eos)
  engines = {"ar": engine.Engine(target.cfg, None, dcfg),
             "spec": engine.Engine(target.cfg, drafter, dcfg)}
  compiled = {"ar": set(), "spec": set()}
  records = []
  for p in prompts:
    ar, _, ar_s = _decode_timed(engines["ar"], tparams, None, p.ids, compiled["ar"])
    spec, stats, spec_s = _decode_timed(engines["spec"], tparams, dparams, p.ids,
                                        compiled["spec"])
    echo = info.decode(p.ids, skip_special_tokens=False)
    reference = continuation_text(info, p.ids, ar, echo, eos)
    lc_run = run_llamacpp(lc, tgt_gguf, dft_gguf, p, echo, window, max_new, threads)
    records.append({"prompt": p.text, "reference": reference, "ar_s": ar_s, "ar_tokens": len(ar),
                    "ours": {**stats.summary(), "tokens": len(spec), "seconds": spec_s,
                             "equals_target_greedy": spec == ar},
                    "llamacpp": {**lc_run, "equals_target_greedy":
                                 lc_run["text"].rstrip().startswith(reference.rstrip())}})
  return {"target": target_dir, "target_gguf_f32": tgt_gguf, "drafter": drafter_dir,
          "drafter_gguf": dft_gguf, "window": window, "max_new_tokens": max_new,
          "threads": threads, "eos_ids": list(eos), "machine": timing.machine_info(),
          "totals": totals(records), "prompts": records}


def totals(records: list) -> dict:
  """Acceptance per drafted token, τ, tokens/s and greedy agreement over all prompts."""
  s = lambda eng, key: sum(r[eng][key] for r in records)
  ours_acc, lc_acc = _rate(s("ours", "accepted"), s("ours", "drafted")), _rate(
      s("llamacpp", "n_accept"), s("llamacpp", "n_drafted"))
  out = {
      "ours": {"acceptance": ours_acc, "accepted": s("ours", "accepted"),
               "drafted": s("ours", "drafted"),
               "tau": _rate(s("ours", "committed"), s("ours", "verify_calls")),
               "tokens_per_s": _rate(s("ours", "tokens"), s("ours", "seconds")),
               "ar_tokens_per_s": _rate(sum(r["ar_tokens"] for r in records),
                                        sum(r["ar_s"] for r in records)),
               "greedy_equal": sum(r["ours"]["equals_target_greedy"] for r in records)},
      "llamacpp": {"acceptance": lc_acc, "accepted": s("llamacpp", "n_accept"),
                   "drafted": s("llamacpp", "n_drafted"),
                   "tau": _rate(s("llamacpp", "n_predict"), s("llamacpp", "rounds")),
                   "tokens_per_s": _rate(s("llamacpp", "n_predict"),
                                         s("llamacpp", "encode_s") + s("llamacpp", "decode_s")),
                   "decode_only_tokens_per_s": _rate(s("llamacpp", "n_predict"),
                                                     s("llamacpp", "decode_s")),
                   "greedy_equal": sum(r["llamacpp"]["equals_target_greedy"] for r in records)},
      "prompts": len(records)}
  out["llamacpp_over_ours_acceptance"] = _rate(lc_acc, ours_acc) if ours_acc else None
  out["ours_over_llamacpp_tokens_per_s"] = _rate(out["ours"]["tokens_per_s"],
                                                 out["llamacpp"]["tokens_per_s"])
  return out


def format_table(result: dict) -> str:
  t = result["totals"]
  n = t["prompts"]
  lines = [f"{'engine':10} {'accepted/drafted':>22} {'τ':>6} {'tok/s':>8} {'greedy = target':>16}"]
  for name, label in (("ours", "ours"), ("llamacpp", "llama.cpp")):
    e = t[name]
    acc = f"{e['acceptance']:.3f} ({e['accepted']}/{e['drafted']})"
    lines.append(f"{label:10} {acc:>22} {e['tau']:6.3f} {e['tokens_per_s']:8.1f} "
                 f"{e['greedy_equal']:>12}/{n}")
  ratio = t["llamacpp_over_ours_acceptance"]
  lines.append(f"K={result['window']}, {result['max_new_tokens']} new tokens, {n} prompts; ours "
               f"AR {t['ours']['ar_tokens_per_s']:.1f} tok/s; llama.cpp decode-only "
               f"{t['llamacpp']['decode_only_tokens_per_s']:.1f} tok/s")
  lines.append("acceptance llama.cpp ÷ ours: " + (f"{ratio:.3f}" if ratio is not None else "-")
               + f"; tok/s ours ÷ llama.cpp: {t['ours_over_llamacpp_tokens_per_s']:.2f}")
  return "\n".join(lines)


def run(argv_unused=None) -> dict:
  if not FLAGS.target or FLAGS.drafter in (None, "none"):
    raise UserError("--target (HF directory) and --drafter (EAGLE-3 export) are required")
  result = run_check(find_llamacpp(FLAGS.llamacpp_dir), FLAGS.target, FLAGS.drafter,
                     window=FLAGS.window, max_new=FLAGS.max_new_tokens,
                     target_gguf=FLAGS.target_gguf, prompts_file=FLAGS.prompts_file,
                     num_prompts=FLAGS.num_prompts, cache_dir=FLAGS.cache_dir,
                     threads=FLAGS.threads)
  return cli.emit(result, "ppow_jax.bench.serve_check", format_table(result), FLAGS.output_json)


if __name__ == "__main__":
  define_flags()
  app.run(cli.main_for(run))
