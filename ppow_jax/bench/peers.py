r"""Our engine against Hugging Face assisted generation and llama.cpp, on the same weights.

  python -m ppow_jax.bench.decode --save_pair=/tmp/pair --batch_sizes=1 --repeats=1
  PEER_DIR=$(bash launch/build_llamacpp.sh ~/.cache/ppow_jax/llamacpp)
  python -m ppow_jax.bench.peers --pair_dir=/tmp/pair --window=5 --max_new_tokens=256 \
      --llamacpp_bin=$PEER_DIR/build/bin/llama-speculative-simple --output_json=/tmp/peers.json

Greedy, batch 1, CPU, float32, the same prompt ids everywhere (BOS + the prompt's tokens, as
llama.cpp tokenizes it). Each engine runs once untimed (compile / warm-up), then ``--repeats``
times interleaved with the others; tokens/s is the median, end to end (prompt pass included)
for every engine; llama.cpp's own decode-only rate is reported beside it.

* ours: ``ppow_jax.engine`` (one compiled call per generation), AR and speculative.
* HF: ``target.generate(assistant_model=drafter)`` with a constant window of K
  (``num_assistant_tokens=K``, ``num_assistant_tokens_schedule="constant"``,
  ``assistant_confidence_threshold=0``), verifications counted by a streamer; and plain greedy.
* llama.cpp: ``llama-speculative-simple`` with ``--spec-draft-n-max K --spec-draft-p-min 0`` on
  f32 GGUFs converted by its ``convert_hf_to_gguf.py``; ``llama-bench`` (if built next to it)
  for the target's AR rate. llama.cpp prints text, not ids: with the synthetic pair's
  one-character tokenizer the text maps back to ids exactly. It may overshoot ``-n`` by up to
  K tokens, so outputs are compared on their common prefix.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from typing import Optional

from absl import flags
import jax
import numpy as np

from ppow_jax import cli, drafters, engine, timing
from ppow_jax.errors import UserError
from ppow_jax.models import hf

FLAGS = flags.FLAGS


def define_flags() -> None:
  """This tool's flags (defined when it runs, so that importing it defines none)."""
  flags.DEFINE_string("pair_dir", None, "Directory with target/ and drafter/ (HF layout).")
  flags.DEFINE_string("llamacpp_bin", None, "Path to llama.cpp's llama-speculative-simple "
                      "(built by launch/build_llamacpp.sh); omit to skip llama.cpp.")
  flags.DEFINE_integer("threads", 0, "CPU threads for torch and llama.cpp (0: all cores).")
  flags.DEFINE_boolean("skip_hf", False, "Skip the Hugging Face peer.")
  flags.DEFINE_integer("window", 5, "K: draft tokens per verification.")
  flags.DEFINE_integer("max_new_tokens", 128, "New tokens per generation.")
  flags.DEFINE_string("prompt", None, "Prompt text (default: a short Python snippet).")
  flags.DEFINE_integer("repeats", 3, "Timed runs per engine and mode (after one warm-up).")
  flags.DEFINE_string("output_json", None, "Write the numbers here.")


DEFAULT_PROMPT = ("def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + "
                  "fibonacci(n - 2) # print the first ten numbers")


def _prompt_ids(tok, tok_config: dict, text: str) -> list[int]:
  """The ids llama.cpp feeds: BOS (when the tokenizer config adds one) + the text's tokens."""
  ids = tok.encode(text).ids
  bos = tok.token_to_id(tok_config.get("bos_token") or "")
  if tok_config.get("add_bos_token", False) and bos is not None:
    ids = [bos] + ids
  return ids


def decode_only_rate(new_tokens: int, full_s: float, prompt_s: float) -> Optional[float]:
  """Tokens/s of generation without its prompt pass: ``new_tokens - 1`` tokens in the time
  a whole generation takes beyond the prompt pass plus its first token (``prompt_s``, what
  llama-bench's generation rate leaves out too); None when noise hides the rate."""
  return timing.rate_beyond(new_tokens - 1, full_s, prompt_s)


def _common_prefix(a: list[int], b: list[int]) -> dict:
  n = min(len(a), len(b))
  first = next((i for i in range(n) if a[i] != b[i]), None)
  return {"identical_on_common_prefix": first is None, "compared_tokens": n,
          "first_mismatch": first}


# ----------------------------------------------------------------------------- ours


class _Ours:
  def __init__(self, pair_dir: str, window: int, max_new: int, prompt: list[int]):
    target, tp = hf.load(os.path.join(pair_dir, "target"))
    draft, dp = hf.load(os.path.join(pair_dir, "drafter"))
    hf.check_same_vocab(target.cfg, draft.cfg, where=pair_dir)
    self.tp, self.dp = engine.decoding_pair(tp, dp)
    cfg = engine.DecodeConfig(window=window, max_new_tokens=max_new, eos_ids=())
    # "prompt": the prompt pass and one token, whose time the decode-only AR rate leaves out
    # (llama-bench's generation rate counts no prompt pass)
    self.engines = {"ar": engine.Engine(target.cfg, None, cfg),
                    "spec": engine.Engine(target.cfg, drafters.LMDrafter(draft.cfg), cfg),
                    "prompt": engine.Engine(target.cfg, None,
                                            dataclasses.replace(cfg, max_new_tokens=1))}
    self.prompts, self.lens = engine.pad_prompts([prompt])
    self.out = {}

  def run(self, name: str) -> None:
    dp = self.dp if name == "spec" else None
    self.out[name] = jax.block_until_ready(self.engines[name].generate(
        self.tp, dp, self.prompts, self.lens, jax.random.PRNGKey(0)))

  def tokens(self, name: str) -> list[int]:
    return self.out[name].new_tokens()[0]


# ----------------------------------------------------------------------------- Hugging Face


class _Hf:
  def __init__(self, pair_dir: str, window: int, max_new: int, prompt: list[int], threads: int):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)
    load = lambda sub: AutoModelForCausalLM.from_pretrained(
        os.path.join(pair_dir, sub), dtype=torch.float32).eval()
    self.torch, self.target, self.assistant = torch, load("target"), load("drafter")
    gc = self.assistant.generation_config
    gc.num_assistant_tokens = window
    gc.num_assistant_tokens_schedule = "constant"
    gc.assistant_confidence_threshold = 0.0
    self.ids = torch.tensor([prompt], dtype=torch.long)
    self.max_new = max_new

    class Counter(BaseStreamer):
      """The prompt arrives first, then one put per verification (accepted + 1 tokens)."""

      def __init__(self):
        self.puts = []

      def put(self, value):
        self.puts.append(int(value.numel()))

      def end(self):
        pass

    self.counter_cls = Counter
    self.out, self.verifications = {}, None

  def run(self, name: str) -> None:
    streamer = self.counter_cls()
    kwargs = dict(do_sample=False, max_new_tokens=self.max_new, min_new_tokens=self.max_new,
                  attention_mask=self.torch.ones_like(self.ids), pad_token_id=0,
                  streamer=streamer)
    if name == "spec":
      kwargs["assistant_model"] = self.assistant
    with self.torch.inference_mode():
      out = self.target.generate(self.ids, **kwargs)
    self.out[name] = out[0, self.ids.shape[1]:].tolist()
    if name == "spec":
      self.verifications = len(streamer.puts) - 1

  def tokens(self, name: str) -> list[int]:
    return self.out[name]


# ----------------------------------------------------------------------------- llama.cpp


_CONVERT_RUNNER = (
    # convert_hf_to_gguf imports sentencepiece before it looks for tokenizer.model. Without
    # sentencepiece installed, raise the FileNotFoundError it would raise for a missing
    # tokenizer.model, so that it falls through to the tokenizer.json path our pair uses.
    "import importlib.util, os, runpy, sys\n"
    "script = sys.argv[1]; sys.argv = sys.argv[1:]\n"
    "sys.path.insert(0, os.path.dirname(os.path.abspath(script)))\n"
    "if importlib.util.find_spec('sentencepiece') is None:\n"
    "  from conversion import base\n"
    "  orig = base.TextModel._create_vocab_sentencepiece\n"
    "  def create(self):\n"
    "    if not (self.dir_model / 'tokenizer.model').is_file():\n"
    "      raise FileNotFoundError('no tokenizer.model')\n"
    "    return orig(self)\n"
    "  base.TextModel._create_vocab_sentencepiece = create\n"
    "runpy.run_path(script, run_name='__main__')\n")


def convert_to_gguf(root: str, hf_dir: str, out_file: str, extra_args: tuple = ()) -> str:
  """f32 GGUF of an HF directory with llama.cpp's converter (skipped when up to date)."""
  weights = os.path.join(hf_dir, "model.safetensors")
  if os.path.isfile(out_file) and os.path.getmtime(out_file) >= os.path.getmtime(weights):
    return out_file
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [os.path.join(root, "gguf-py")] + [p for p in [env.get("PYTHONPATH")] if p])
  cmd = [sys.executable, "-c", _CONVERT_RUNNER, os.path.join(root, "convert_hf_to_gguf.py"),
         hf_dir, "--outfile", out_file, "--outtype", "f32", *extra_args]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if proc.returncode != 0:
    raise UserError(f"convert_hf_to_gguf failed on {hf_dir}:\n{proc.stderr[-3000:]}")
  return out_file


class _LlamaCpp:
  def __init__(self, binary: str, pair_dir: str, window: int, max_new: int, text: str,
               prompt: list[int], threads: int, tok):
    if not os.access(binary, os.X_OK):
      raise UserError(f"--llamacpp_bin: {binary} is not an executable")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(binary))))
    gguf_dir = os.path.join(pair_dir, "gguf")
    os.makedirs(gguf_dir, exist_ok=True)
    self.models = {sub: convert_to_gguf(root, os.path.join(pair_dir, sub),
                                        os.path.join(gguf_dir, f"{sub}-f32.gguf"))
                   for sub in ("target", "drafter")}
    ctx = len(prompt) + max_new + 2 * window + 16
    self.cmd = [binary, "-m", self.models["target"], "-md", self.models["drafter"], "-p", text,
                "-n", str(max_new), "--spec-type", "draft-simple", "--spec-draft-n-max",
                str(window), "--spec-draft-n-min", "0", "--spec-draft-p-min", "0", "--temp", "0",
                "--top-k", "1", "--ignore-eos", "-t", str(threads), "-td", str(threads),
                "-c", str(ctx), "--seed", "0"]
    bench = os.path.join(os.path.dirname(binary), "llama-bench")
    self.bench_cmd = ([bench, "-m", self.models["target"], "-p", "0", "-n", str(max_new),
                       "-t", str(threads), "-r", "1", "-o", "json"]
                      if os.access(bench, os.X_OK) else None)
    self.echo = tok.decode(prompt, skip_special_tokens=False)
    self.tok, self.runs, self.text = tok, [], None

  def run(self, name: str) -> None:
    if name == "ar":
      if self.bench_cmd is None:
        return
      proc = subprocess.run(self.bench_cmd, capture_output=True, text=True)
      if proc.returncode != 0:
        raise UserError(f"llama-bench failed:\n{proc.stderr[-2000:]}")
      rows = json.loads(proc.stdout)
      self.runs.append({"ar_tokens_per_s": float(rows[0]["avg_ts"])})
      return
    for _ in range(3):  # its asynchronous logger sometimes loses the last lines at exit
      t0 = time.perf_counter()
      proc = subprocess.run(self.cmd, capture_output=True, text=True)
      wall = time.perf_counter() - t0
      if proc.returncode != 0:
        raise UserError(f"llama-speculative-simple failed:\n{proc.stderr[-3000:]}")
      log = proc.stdout + proc.stderr
      if re.search(r"n_accept\s*=", log):
        break

    def grab(pattern: str, cast=float):
      m = re.search(pattern, log)
      if m is None:
        raise UserError(f"llama-speculative-simple: no match for {pattern!r} in:\n{log[-3000:]}")
      return cast(m.group(1))

    enc_s = grab(r"encoded\s+\d+ tokens in\s+([\d.]+) seconds")
    n, dec_s = grab(r"decoded\s+(\d+) tokens", int), grab(r"decoded\s+\d+ tokens in\s+([\d.]+) s")
    self.runs.append({"n_predict": n, "encode_s": enc_s, "decode_s": dec_s, "wall_s": wall,
                      "n_drafted": grab(r"n_drafted\s*=\s*(\d+)", int),
                      "n_accept": grab(r"n_accept\s*=\s*(\d+)", int)})
    at = proc.stdout.find(self.echo)  # stdout is the prompt, then the generated text
    self.text = proc.stdout[at + len(self.echo):].rstrip("\n") if at >= 0 else None

  def tokens(self) -> Optional[list[int]]:
    """Ids of the printed text: exact for a tokenizer of one-character pieces, else None."""
    if self.text is None:
      return None
    vocab = self.tok.get_vocab()
    specials = sorted((p for p in vocab if len(p) > 1), key=len, reverse=True)
    if any(len(p) > 1 and not (p.startswith("<") and p.endswith(">")) for p in vocab):
      return None
    ids, i, text = [], 0, self.text
    while i < len(text):
      hit = next((p for p in specials if text.startswith(p, i)), None)
      piece = hit or ("\u2581" if text[i] == " " else text[i])
      if piece not in vocab:
        return None
      ids.append(vocab[piece])
      i += len(piece)
    return ids


# ----------------------------------------------------------------------------- main


def run_peers(pair_dir: str, window: int, max_new: int, text: str, repeats: int,
              threads: int, llamacpp_bin: Optional[str] = None, skip_hf: bool = False) -> dict:
  """Tokens/s and greedy output of each engine; see the module docstring."""
  tok = hf.load_tokenizer(os.path.join(pair_dir, "target"))
  cfg_path = os.path.join(pair_dir, "target", "tokenizer_config.json")
  tok_config = json.load(open(cfg_path)) if os.path.isfile(cfg_path) else {}
  prompt = _prompt_ids(tok, tok_config, text)
  load_start = list(os.getloadavg())
  peers = {"ours": _Ours(pair_dir, window, max_new, prompt)}
  if not skip_hf:
    peers["hf"] = _Hf(pair_dir, window, max_new, prompt, threads)
  if llamacpp_bin:
    peers["llamacpp"] = _LlamaCpp(llamacpp_bin, pair_dir, window, max_new, text, prompt, threads,
                                  tok)
  runs = {f"{p}/{m}": (lambda peer=peer, m=m: peer.run(m))
          for p, peer in peers.items() for m in ("ar", "spec")}
  runs["ours/prompt"] = lambda: peers["ours"].run("prompt")
  timed = timing.interleaved(runs, repeats, alternate=True)
  med = lambda p, m: timed.median(f"{p}/{m}")
  ours = peers["ours"]
  o_stats = ours.out["spec"].stats.summary()
  result = {
      "pair_dir": os.path.abspath(pair_dir), "window": window, "max_new_tokens": max_new,
      "prompt": text, "prompt_ids": prompt, "repeats": repeats, "threads": threads,
      "machine": timing.machine_info(), "load_avg_start_1_5_15": load_start,
      "ours": {"spec_tokens_per_s": max_new / med("ours", "spec"),
               "ar_tokens_per_s": max_new / med("ours", "ar"),
               "ar_decode_only_tokens_per_s": decode_only_rate(max_new, med("ours", "ar"),
                                                               med("ours", "prompt")),
               "tau": o_stats["tau"], "verify_calls": o_stats["verify_calls"],
               "tokens": ours.tokens("spec"),
               "spec_equals_ar": ours.tokens("spec") == ours.tokens("ar")}}
  ours_tps = result["ours"]["spec_tokens_per_s"]
  if "hf" in peers:
    h = peers["hf"]
    result["hf"] = {"spec_tokens_per_s": max_new / med("hf", "spec"),
                    "ar_tokens_per_s": max_new / med("hf", "ar"),
                    "verifications": h.verifications,
                    "tau": max_new / max(h.verifications, 1),
                    "tokens": h.tokens("spec"), "spec_equals_ar": h.tokens("spec") == h.tokens("ar"),
                    "same_tokens_as_ours": h.tokens("spec") == ours.tokens("spec")}
    result["hf"].update(_common_prefix(ours.tokens("spec"), h.tokens("spec")))
    result["ours_over_hf"] = ours_tps / result["hf"]["spec_tokens_per_s"]
  if "llamacpp" in peers:
    lc = peers["llamacpp"]
    spec_runs = [r for r in lc.runs if "n_predict" in r][1:]  # the first one warms up
    n = [r["n_predict"] for r in spec_runs]
    e2e = float(np.median([r["n_predict"] / (r["encode_s"] + r["decode_s"]) for r in spec_runs]))
    dec = float(np.median([r["n_predict"] / r["decode_s"] for r in spec_runs]))
    ar = [r["ar_tokens_per_s"] for r in lc.runs if "ar_tokens_per_s" in r][1:]
    last = spec_runs[-1]
    lc_tokens = lc.tokens()
    result["llamacpp"] = {
        "spec_tokens_per_s": e2e, "spec_decode_only_tokens_per_s": dec,
        "ar_tokens_per_s_llama_bench": float(np.median(ar)) if ar else None,
        "n_predict": n, "n_drafted": last["n_drafted"], "n_accept": last["n_accept"],
        # every round commits its accepted drafts + 1 target token
        "tau": last["n_predict"] / max(last["n_predict"] - last["n_accept"], 1),
        "command": lc.cmd, "text": lc.text, "tokens": lc_tokens,
        "gguf": lc.models}
    if lc_tokens is not None:
      result["llamacpp"].update(_common_prefix(ours.tokens("spec"), lc_tokens))
    elif lc.text is not None:  # a real tokenizer: compare the text (llama.cpp may overshoot)
      ours_text = tok.decode(ours.tokens("spec"), skip_special_tokens=False)
      n = min(len(ours_text), len(lc.text))
      result["llamacpp"]["same_text_as_ours"] = ours_text[:n] == lc.text[:n]
      result["llamacpp"]["compared_characters"] = n
    result["ours_over_llamacpp"] = ours_tps / e2e
    result["ours_over_llamacpp_decode_only"] = ours_tps / dec
    # both decode-only: llama-bench's generation rate, ours without the prompt pass
    if ar and result["ours"]["ar_decode_only_tokens_per_s"]:
      result["ours_ar_over_llamacpp_ar"] = (result["ours"]["ar_decode_only_tokens_per_s"]
                                            / result["llamacpp"]["ar_tokens_per_s_llama_bench"])
  result["load_avg_end_1_5_15"] = list(os.getloadavg())
  return result


def format_table(r: dict) -> str:
  lines = [f"{'engine':10} {'spec tok/s':>10} {'AR tok/s':>9} {'τ':>6}  same greedy ids as ours"]
  lines.append(f"{'ours':10} {r['ours']['spec_tokens_per_s']:10.1f} "
               f"{r['ours']['ar_tokens_per_s']:9.1f} {r['ours']['tau']:6.2f}  (spec == AR: "
               f"{r['ours']['spec_equals_ar']})")
  if "hf" in r:
    h = r["hf"]
    lines.append(f"{'HF':10} {h['spec_tokens_per_s']:10.1f} {h['ar_tokens_per_s']:9.1f} "
                 f"{h['tau']:6.2f}  {h['same_tokens_as_ours']} (first mismatch "
                 f"{h['first_mismatch']})")
  if "llamacpp" in r:
    lc = r["llamacpp"]
    ar = lc["ar_tokens_per_s_llama_bench"]
    same = (f"{lc.get('identical_on_common_prefix')} on {lc.get('compared_tokens')} tokens "
            f"(first mismatch {lc.get('first_mismatch')})" if "compared_tokens" in lc else
            f"text {lc.get('same_text_as_ours')} on {lc.get('compared_characters')} characters")
    lines.append(f"{'llama.cpp':10} {lc['spec_tokens_per_s']:10.1f} "
                 f"{(f'{ar:9.1f}' if ar else '        -')} {lc['tau']:6.2f}  {same}; "
                 f"decode-only {lc['spec_decode_only_tokens_per_s']:.1f} tok/s")
  rate = r["ours"]["ar_decode_only_tokens_per_s"]
  lines.append("ours AR decode-only (prompt pass left out): " + (
      f"{rate:.1f} tok/s" if rate else "- (the prompt-only call timed as slow as the whole one)"))
  for key in ("ours_over_hf", "ours_over_llamacpp", "ours_over_llamacpp_decode_only",
              "ours_ar_over_llamacpp_ar"):
    if key in r:
      lines.append(f"{key}: {r[key]:.2f}")
  lines.append(f"load average {r['load_avg_start_1_5_15'][0]:.2f} -> "
               f"{r['load_avg_end_1_5_15'][0]:.2f}")
  return "\n".join(lines)


def run(argv) -> dict:
  if not FLAGS.pair_dir:
    raise UserError("--pair_dir is required (write one with ppow_jax.bench.decode --save_pair)")
  threads = FLAGS.threads or os.cpu_count()
  result = run_peers(FLAGS.pair_dir, FLAGS.window, FLAGS.max_new_tokens,
                     FLAGS.prompt or DEFAULT_PROMPT, FLAGS.repeats, threads, FLAGS.llamacpp_bin,
                     FLAGS.skip_hf)
  return cli.emit(result, "ppow_jax.bench.peers", format_table(result), FLAGS.output_json)


if __name__ == "__main__":
  define_flags()
  cli.run_main(run)
