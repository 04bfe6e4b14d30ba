"""serve_check: llama.cpp's EAGLE-3 path against our engine on a tiny pair built to accept.

The end-to-end test needs llama.cpp built by ``launch/build_llamacpp.sh`` and its folder in
$PPOW_LLAMACPP_DIR; without it that test is skipped and the parsing/accounting tests still run.
"""

import dataclasses
import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import jax
import numpy as np

from ppow_jax.bench import pairs, serve_check
from ppow_jax.errors import UserError
from ppow_jax.models import eagle3, eagle3_io, hf


WINDOW = 3
SPECIALS = 3  # <unk>, <s>, </s>: ids 0..2 of pairs.vocab_pieces


def _log(n_predict=10, n_drafted=12, n_accept=4, gen="xyz", echo="<s> ab"):
  stdout = f"\n\n{echo}{gen}\n\n\n\n"
  stderr = (f"encoded    3 tokens in    0.010 seconds, speed: 300.0 t/s\n"
            f"decoded   {n_predict} tokens in    0.250 seconds, speed: 40.0 t/s\n\n"
            f"n_draft   = 3\nn_predict = {n_predict}\nn_drafted = {n_drafted}\n"
            f"n_accept  = {n_accept}\naccept    = 33.333%\n")
  return stdout, stderr


class ParsingTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.enterContext(jax.numpy_rank_promotion("raise"))

  def test_parse_speculative_log(self):
    out = serve_check.parse_speculative_log(*_log(gen="x\n\ny "), echo="<s> ab")
    self.assertEqual(out["text"], "x\n\ny ")  # inner blank lines kept, the trailer dropped
    self.assertEqual((out["n_predict"], out["n_drafted"], out["n_accept"], out["rounds"]),
                     (10, 12, 4, 6))
    self.assertAlmostEqual(out["decode_s"], 0.25)
    self.assertAlmostEqual(out["encode_s"], 0.01)

  def test_parse_rejects_a_different_prompt(self):
    with self.assertRaisesRegex(UserError, "tokenized the prompt differently"):
      serve_check.parse_speculative_log(*_log(echo="<s> ab"), echo="<s> ac")

  def test_totals(self):
    rec = lambda acc, dr, com, calls, na, nd, npred: {
        "ar_tokens": 8, "ar_s": 0.5,
        "ours": {"accepted": acc, "drafted": dr, "committed": com, "verify_calls": calls,
                 "tokens": com, "seconds": 1.0, "equals_target_greedy": True},
        "llamacpp": {"n_accept": na, "n_drafted": nd, "n_predict": npred,
                     "rounds": npred - na, "encode_s": 0.5, "decode_s": 1.5,
                     "equals_target_greedy": False}}
    t = serve_check.totals([rec(3, 9, 9, 6, 4, 12, 10), rec(1, 3, 3, 2, 0, 3, 2)])
    self.assertAlmostEqual(t["ours"]["acceptance"], 4 / 12)
    self.assertAlmostEqual(t["ours"]["tau"], 12 / 8)
    self.assertAlmostEqual(t["ours"]["tokens_per_s"], 6.0)
    self.assertAlmostEqual(t["ours"]["ar_tokens_per_s"], 16.0)
    self.assertAlmostEqual(t["llamacpp"]["acceptance"], 4 / 15)
    self.assertAlmostEqual(t["llamacpp"]["tau"], 12 / 8)
    self.assertAlmostEqual(t["llamacpp"]["tokens_per_s"], 12 / 4.0)
    self.assertAlmostEqual(t["llamacpp"]["decode_only_tokens_per_s"], 12 / 3.0)
    self.assertAlmostEqual(t["llamacpp_over_ours_acceptance"], (4 / 15) / (4 / 12))
    self.assertEqual((t["ours"]["greedy_equal"], t["llamacpp"]["greedy_equal"]), (2, 0))

  def test_find_llamacpp_names_what_is_missing(self):
    with tempfile.TemporaryDirectory() as d:
      with self.assertRaisesRegex(UserError, "llama-speculative-simple.*build_llamacpp.sh"):
        serve_check.find_llamacpp(d)

  def test_command_line_reads_its_own_flags(self):
    # run as a user would: every flag the command reads is its own; a missing build is one
    # line naming what is missing, exit status 2
    missing = tempfile.mkdtemp()
    proc = subprocess.run(
        [sys.executable, "-m", "ppow_jax.bench.serve_check", "--target=t", "--drafter=d",
         "--window=3", "--max_new_tokens=8", "--threads=1", "--output_json=o.json",
         f"--llamacpp_dir={missing}"], capture_output=True, text=True, timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    os.rmdir(missing)
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertIn(f"llama.cpp at {missing} lacks", proc.stderr.strip().splitlines()[-1])

  def test_content_stamp_follows_the_file(self):
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, "w")
      with open(path, "w") as f:
        f.write("a")
      first = serve_check.content_stamp(path)
      os.utime(path, ns=(1, 1))
      self.assertNotEqual(serve_check.content_stamp(path), first)


def bigram_pair(out_dir: str, seed: int = 0) -> tuple[str, str]:
  """A target that is a permutation bigram and an EAGLE-3 drafter that predicts it one ahead.

  Target: every layer's output projections are zero, so the final hidden state is the current
  token's embedding e_c, and ``lm_head[:, f(c)] = e_c`` makes the greedy next token f(c) for a
  permutation f of the non-special ids. Drafter: ``fc`` passes the third fused feature
  through, the midlayer adds nothing, and its head column for f(f(c)) is e_c. An entry pairs
  the feature of position j with token j+1 and predicts token j+2 = f(f(t_j)): the first draft
  of every window is right, the fed-back ones repeat it and are wrong (f has no fixed points
  there). Exercises the export, fc, the final norm, the head and the d2t offsets (a reduced
  draft vocabulary without the special ids).
  """
  with jax.numpy_rank_promotion("allow"):  # the model code broadcasts norm scales implicitly
    return _bigram_pair(out_dir, seed)


def _bigram_pair(out_dir: str, seed: int) -> tuple[str, str]:
  spec = pairs.SyntheticSpec(num_layers=6, hidden_size=64, intermediate_size=128, vocab_size=160,
                             num_heads=4, num_kv_heads=2, max_position_embeddings=512,
                             residual_scale=0.0, seed=seed)
  pair = pairs.synthetic_pair(spec)
  params = jax.tree_util.tree_map(np.array, pair.target_params)
  layer0 = params["layers_0"]
  layer0["self_attn"]["o_proj"][:] = 0
  layer0["mlp"]["down_proj"][:] = 0
  v = spec.vocab_size
  rng = np.random.RandomState(seed)
  order = SPECIALS + rng.permutation(v - SPECIALS)  # one cycle through every normal id
  f = np.arange(v)
  f[order] = np.roll(order, -1)
  emb_VxE = params["embed_tokens"]
  emb_VxE /= np.linalg.norm(emb_VxE, axis=1, keepdims=True)
  head_ExV = np.zeros((spec.hidden_size, v), np.float32)
  head_ExV[:, f] = emb_VxE.T * 20.0
  params["lm_head"] = head_ExV
  target = dataclasses.replace(pair, target_params=params)
  paths = pairs.save_pair(target, out_dir)

  dcfg = eagle3.Eagle3Config.from_target(pair.target_cfg, draft_vocab_size=v - SPECIALS)
  dparams = jax.tree_util.tree_map(np.array, eagle3.init_eagle3(dcfg, jax.random.PRNGKey(seed)))
  e = spec.hidden_size
  dparams["fc"][:] = 0
  dparams["fc"][2 * e:, :] = np.eye(e, dtype=np.float32)
  dparams["midlayer"]["self_attn"]["o_proj"][:] = 0
  dparams["midlayer"]["mlp"]["down_proj"][:] = 0
  counts = np.ones(v)
  counts[:SPECIALS] = 0
  vocab = eagle3.build_draft_vocab(counts, v - SPECIALS)
  kept = np.arange(v - SPECIALS) + np.asarray(vocab.d2t_Vd)  # draft id -> target id
  inverse2 = np.argsort(f[f])  # c with f(f(c)) = t
  dparams["lm_head"] = (emb_VxE[inverse2[kept]].T * 20.0).astype(np.float32)
  drafter_dir = os.path.join(out_dir, "eagle3")
  eagle3_io.save_eagle3(drafter_dir, dcfg, dparams, vocab)
  return paths["target"], drafter_dir


class EndToEndTest(absltest.TestCase):

  def test_both_engines_accept_the_same_and_keep_the_target_output(self):
    if not os.environ.get(serve_check.ENV_DIR):
      self.skipTest(f"llama.cpp not built: set {serve_check.ENV_DIR} to the folder that "
                    "launch/build_llamacpp.sh prints")
    lc = serve_check.find_llamacpp()
    with tempfile.TemporaryDirectory() as d:
      target_dir, drafter_dir = bigram_pair(d)
      prompts = os.path.join(d, "prompts.jsonl")
      with open(prompts, "w") as f:
        for text in ("abc", "Hello world"):
          f.write(json.dumps({"prompt": text}) + "\n")
      with jax.numpy_rank_promotion("allow"):  # as above: the engine's model code
        r = serve_check.run_check(lc, target_dir, drafter_dir, window=WINDOW, max_new=24,
                                  prompts_file=prompts, num_prompts=2,
                                  cache_dir=os.path.join(d, "cache"), threads=2)
    t = r["totals"]
    self.assertEqual(t["ours"]["greedy_equal"], 2, r["prompts"])
    self.assertEqual(t["llamacpp"]["greedy_equal"], 2, r["prompts"])
    # First draft of each window right (but the very first: it is drafted from the prompt's
    # entries), the other K-1 wrong: just under 1/K per drafted token and τ just under 2.
    self.assertBetween(t["ours"]["acceptance"], 0.8 / WINDOW, 1 / WINDOW)
    self.assertBetween(t["ours"]["tau"], 1.8, 2.0)
    self.assertAlmostEqual(t["llamacpp"]["acceptance"], t["ours"]["acceptance"],
                           delta=0.1 * t["ours"]["acceptance"])
    self.assertAlmostEqual(t["llamacpp"]["tau"], t["ours"]["tau"], delta=0.1 * t["ours"]["tau"])


if __name__ == "__main__":
  absltest.main()
