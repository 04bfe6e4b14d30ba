r"""Cost of a PPOW step vs a token-level baseline step, side by side, per window.

  python -m ppow_jax.bench.train_cost --config=configs/tiny.py --workdir=workdir/tiny

Uses the run's target (pretrained by the demo, or ``config.target.hf_dir``) and a fresh drafter
of the configured kind; both steps see the same batches. A "window" is one drafted window of
K tokens for PPOW (B·S·G per step) and one training position for the baseline (every position
starts a TTT chain: B·T per step). Reports steps/s and windows/s (median of interleaved runs,
``ppow_jax/timing.py``).
"""

from __future__ import annotations

import json

from absl import flags
import jax

from ppow_jax import cli, datasets, drafter_stages, layout, pretrain, settings, timing, train_step

FLAGS = flags.FLAGS


def define_flags() -> None:
  """This tool's flags (defined when it runs, so that importing it defines none)."""
  cli.define_config_flag()
  flags.DEFINE_string("workdir", "workdir/default", "Run directory holding the target.")
  flags.DEFINE_integer("repeats", 5, "Timed steps of each kind (interleaved).")
  flags.DEFINE_string("output_json", None, "Write the numbers here.")


def measure(c, workdir: str, repeats: int) -> dict:
  settings.validate(c)
  paths = layout.Layout(workdir)
  data = datasets.load(c, paths)
  tcfg, tparams, _ = pretrain.get_target(c, paths, data, train=False)
  drafter, init = drafter_stages.build_drafter(c, tcfg, data)
  trainable, constants = train_step.split_params(drafter, init)
  opt = train_step.make_optimizer(settings.optim(c.baseline.optim))
  pcfg = settings.ppow(c, max(c.ppow.gamma, 0.0))
  states = {"baseline": train_step.init_state(trainable, opt, jax.random.PRNGKey(0)),
            "ppow": train_step.init_ppow_state(trainable, opt, jax.random.PRNGKey(0), pcfg,
                                               c.ppow.batch_size, c.data.seq_len)}
  steps = {
      "baseline": (jax.jit(train_step.make_baseline_step(tcfg, drafter,
                                                         settings.baseline(c), opt)),
                   c.baseline.batch_size),
      "ppow": (jax.jit(train_step.make_ppow_step(tcfg, drafter, pcfg, opt,
                                                 settings.baseline(c))),
               c.ppow.batch_size),
  }
  batches = {name: next(datasets.train_iterator(data, c.data.seq_len, b, 0))
             for name, (_, b) in steps.items()}
  timed = timing.interleaved(
      {name: (lambda fn=fn, name=name: fn(states[name], tparams, constants, batches[name]))
       for name, (fn, _) in steps.items()}, repeats)
  out = {}
  for name in steps:
    sec, windows = timed.median(name), float(timed.first[name][1]["windows"])
    out[name] = {"seconds_per_step": sec, "windows_per_step": windows,
                 "windows_per_s": windows / sec, "seconds_all": timed.seconds[name]}
  out["ppow_over_baseline_seconds_per_window"] = (
      out["ppow"]["seconds_per_step"] / out["ppow"]["windows_per_step"]) / (
      out["baseline"]["seconds_per_step"] / out["baseline"]["windows_per_step"])
  out["machine"] = timing.machine_info()
  return out


def run(argv) -> None:
  cli.require_positive("repeats")
  result = measure(cli.config_from_flags(), FLAGS.workdir, FLAGS.repeats)
  print(json.dumps(result, indent=1))
  if FLAGS.output_json:
    cli.write_json(FLAGS.output_json, result)


if __name__ == "__main__":
  define_flags()
  cli.run_main(run)
