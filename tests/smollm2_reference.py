"""transformers' outputs for the real SmolLM2-135M-Instruct GGUF, kept for tests/gguf_test.py.

  python tests/smollm2_reference.py     # rewrites tests/smollm2_reference.json

transformers reads the GGUF with its own loader (dequantization, q/k un-permutation, tokenizer
and chat template from the metadata); parsing the 49k-token vocabulary three times and loading
the model takes about a minute on two cores, so the suite compares against this file instead
of running transformers each time. The file records the GGUF's SHA-256: the test refuses a
reference made from other weights. Needs torch and transformers (the ``test`` extra).
"""

import hashlib
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "tests", "smollm2_reference.json")
TURNS = [("user", "What is 17 * 24? Then write print(1234).")]
TEXTS = ("Digits 0123456789 and 3.14!", "  def f(x):\n\treturn x**2")
NUM_TOKENS = 16  # prompt positions whose logits are compared
TOP_K = 8  # per position, the columns with the largest logits are kept ...
RANDOM_COLUMNS = 64  # ... and these, drawn once from the vocabulary


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def main() -> None:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, REPO)
  from ppow_jax.models import gguf_convert  # pylint: disable=g-import-not-at-top
  path = gguf_convert.smollm2_gguf()
  d, f = os.path.split(path)
  tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
  chat = tok.apply_chat_template([{"role": r, "content": c} for r, c in TURNS], tokenize=False,
                                 add_generation_prompt=True)
  ids = tok.encode(chat, add_special_tokens=False)[:NUM_TOKENS]
  model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
  with torch.no_grad():
    logits = model(torch.tensor([ids], dtype=torch.long)).logits[0].numpy()
  top = np.argsort(-logits, axis=-1)[:, :TOP_K].ravel()
  drawn = np.random.default_rng(0).choice(logits.shape[-1], RANDOM_COLUMNS, replace=False)
  columns = sorted(set(top.tolist()) | set(drawn.tolist()))
  ref = {
      "gguf": f, "gguf_sha256": sha256(path), "transformers": transformers.__version__,
      "turns": TURNS, "chat_text": chat,
      "encodings": {s: tok.encode(s, add_special_tokens=False) for s in TEXTS + (chat,)},
      "ids": ids, "argmax": logits.argmax(-1).tolist(), "columns": columns,
      "logits": np.round(logits[:, columns], 6).tolist(),
  }
  tmp = OUT + ".tmp"
  rows = ["  " + json.dumps(row) for row in ref.pop("logits")]  # one position per line
  with open(tmp, "w") as out:
    out.write("{\n" + "".join(f"{json.dumps(k)}: {json.dumps(v, ensure_ascii=False)},\n"
                              for k, v in ref.items()))
    out.write('"logits": [\n' + ",\n".join(rows) + "\n]}\n")
  os.replace(tmp, OUT)
  print(f"wrote {OUT}: {len(ids)} positions x {len(columns)} columns")


if __name__ == "__main__":
  main()
