r"""Entry point: ``python -m ppow_jax.main --config=configs/default.py --workdir=W``.

Overrides go on the command line (``--config.ppow.steps=50``); a key that does not exist is an
error. On a pod, the launcher sets ``PPOW_DISTRIBUTED=1`` and every host runs this same
command; only process 0 writes reports.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ppow_jax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", "workdir/default", "Outputs: checkpoints, drafters, report.")


def main(argv):
  del argv
  from ppow_jax import run, sharding  # after flags: JAX starts here
  sharding.maybe_initialize_distributed()
  import jax
  logging.info("process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  if FLAGS.config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/default.py")
  try:
    path = run.run(FLAGS.config, FLAGS.workdir)
  except (UserError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"done: {os.path.abspath(path)}", flush=True)


if __name__ == "__main__":
  app.run(main)
