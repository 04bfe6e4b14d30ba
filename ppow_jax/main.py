r"""Entry point: ``python -m ppow_jax.main --config=configs/default.py --workdir=W``.

Overrides go on the command line (``--config.ppow.steps=50``); a key that does not exist is an
error naming its dotted path. The config is loaded and checked before JAX starts. Rerunning
the same command resumes; a rerun whose settings differ from what a stage was made with stops
and names the keys (``--retrain=STAGE`` discards that stage on purpose). On a pod, the launcher
sets ``PPOW_DISTRIBUTED=1`` and every host runs this same command; process 0 holds the
workdir's lock and writes the reports.
"""

import os

from absl import flags

from ppow_jax import cli

FLAGS = flags.FLAGS
cli.define_config_flag()
flags.DEFINE_string("workdir", "workdir/default", "Outputs: checkpoints, drafters, report.")
flags.DEFINE_list("retrain", [], "Stages whose checkpoints, export and metrics are discarded "
                  "before the run (after changing their settings on purpose).")


def main(argv_unused):
  config = cli.config_from_flags()  # before JAX: a bad file or key fails in a blink
  from ppow_jax import run, sharding  # JAX starts here
  sharding.maybe_initialize_distributed()
  path = run.run(config, FLAGS.workdir, retrain=tuple(FLAGS.retrain))
  print(f"done: {os.path.abspath(path)}", flush=True)


if __name__ == "__main__":
  cli.run_main(main)
