"""How the tests check a command-line tool's bad input: a non-zero exit and a message naming it."""

import subprocess
import sys

from absl.testing import absltest


def assert_exits_naming(test: absltest.TestCase, module: str, args: list[str],
                        message: str) -> None:
  """``python -m module *args`` exits non-zero and says ``message`` on stderr."""
  proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)
  test.assertNotEqual(proc.returncode, 0)
  test.assertIn(message, proc.stderr)
