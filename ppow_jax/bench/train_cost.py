r"""Cost of a PPOW step vs a token-level baseline step, side by side, per window.

  python -m ppow_jax.bench.train_cost --config=configs/default.py --workdir=workdir/default

Uses the run's target (pretrained by the demo, or ``config.target.hf_dir``) and a fresh drafter
of the configured kind; both steps see the same batches. A "window" is one drafted window of
K tokens for PPOW (B·S·G per step) and one training position for the baseline (every position
starts a TTT chain: B·T per step). Reports steps/s and windows/s (median of interleaved runs).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
import jax
import numpy as np
from ml_collections import config_flags

from ppow_jax import config_lib, datasets, drafter_stages, pretrain, train_step

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Run config.", lock_config=True)
flags.DEFINE_string("workdir", "workdir/default", "Run directory holding the target.")
flags.DEFINE_integer("repeats", 5, "Timed steps of each kind (interleaved).")
flags.DEFINE_string("output_json", None, "Write the numbers here.")


def measure(c, workdir: str, repeats: int) -> dict:
  data = datasets.load(c, workdir)
  tcfg, tparams, _ = pretrain.get_target(c, workdir, data, train=False)
  drafter, init = drafter_stages.build_drafter(c, tcfg, data)
  trainable, constants = train_step.split_params(drafter, init)
  opt = train_step.make_optimizer(config_lib.optim_config(c.baseline.optim))
  pcfg = config_lib.ppow_config(c, max(c.ppow.gamma, 0.0))
  states = {"baseline": train_step.init_state(trainable, opt, jax.random.PRNGKey(0)),
            "ppow": train_step.init_ppow_state(trainable, opt, jax.random.PRNGKey(0), pcfg,
                                               c.ppow.batch_size, c.data.seq_len)}
  steps = {
      "baseline": (jax.jit(train_step.make_baseline_step(tcfg, drafter,
                                                         config_lib.baseline_config(c), opt)),
                   c.baseline.batch_size),
      "ppow": (jax.jit(train_step.make_ppow_step(tcfg, drafter, pcfg, opt,
                                                 config_lib.baseline_config(c))),
               c.ppow.batch_size),
  }
  batches = {name: next(datasets.train_iterator(data, c.data.seq_len, b, 0))
             for name, (_, b) in steps.items()}
  times = {name: [] for name in steps}
  windows = {}
  for name, (fn, _) in steps.items():  # compile
    _, m = fn(states[name], tparams, constants, batches[name])
    windows[name] = float(m["windows"])
  for _ in range(repeats):
    for name, (fn, _) in steps.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(states[name], tparams, constants, batches[name]))
      times[name].append(time.perf_counter() - t0)
  out = {}
  for name in steps:
    sec = float(np.median(times[name]))
    out[name] = {"seconds_per_step": sec, "windows_per_step": windows[name],
                 "windows_per_s": windows[name] / sec, "seconds_all": times[name]}
  out["ppow_over_baseline_seconds_per_window"] = (
      out["ppow"]["seconds_per_step"] / out["ppow"]["windows_per_step"]) / (
      out["baseline"]["seconds_per_step"] / out["baseline"]["windows_per_step"])
  out["machine"] = {"device": jax.devices()[0].device_kind,
                    "load_average": list(os.getloadavg())}
  return out


def main(argv):
  del argv
  result = measure(FLAGS.config, FLAGS.workdir, FLAGS.repeats)
  print(json.dumps(result, indent=1))
  if FLAGS.output_json:
    with open(FLAGS.output_json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  try:
    app.run(main)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
