"""What every command-line tool shares: bad input is one line on stderr and exit status 2;
JSON results are written atomically."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

from ppow_jax.errors import UserError


def write_text(path: str, text: str) -> None:
  """Write ``text`` to ``path`` via a temporary file, so a reader never sees half a file."""
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def write_json(path: str, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=1))


def main_for(run: Callable[[list], Any]) -> Callable[[list], None]:
  """An absl ``main`` that turns ``UserError`` into ``error: ...`` and exit status 2."""

  def main(argv):
    try:
      run(argv)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  return main
