"""What every command-line tool shares: the run config from ``--config=FILE[:ARG]`` plus
``--config.KEY=VALUE`` overrides, bad input as one line on stderr with exit status 2, and
atomic JSON/text writers. Nothing here imports JAX: a broken config fails before it starts.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys
import tempfile
from typing import Any, Callable, Optional, Sequence

from absl import app, flags
import ml_collections

from ppow_jax.errors import UserError

_OVERRIDES: list[tuple[str, str]] = []  # (dotted key, raw value) of --config.KEY=VALUE


def write_text(path: str, text: str) -> None:
  """Write ``text`` to ``path`` via a temporary file, so a reader never sees half a file."""
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def staging_dir(final: str) -> str:
  """A new empty directory beside ``final`` (same filesystem: one rename publishes it whole);
  a parent that cannot be created or written is a one-line UserError."""
  parent, name = os.path.split(os.path.abspath(final))
  try:
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  except OSError as e:
    raise UserError(f"{final}: cannot create a directory next to it ({e})") from None


def emit(result: dict, tool: str, table: str, output_json: Optional[str]) -> dict:
  """A benchmark tool's ending: the command that produced ``result``, its table, its JSON."""
  result["command"] = " ".join([f"python -m {tool}"] + sys.argv[1:])
  print(table)
  if output_json:
    write_json(output_json, result)
  return result


def write_json(path: str, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=1))


def int_list_flag(name: str) -> list[int]:
  """The integers of list flag ``--name``; a ``UserError`` naming it when one is not."""
  raw = flags.FLAGS[name].value
  try:
    return [int(v) for v in raw]
  except ValueError:
    raise UserError(f"--{name}: want comma-separated integers, got {','.join(raw)}") from None


def require_positive(*names: str) -> None:
  """A ``UserError`` naming the first of the integer flags ``--name`` that is below 1."""
  for name in names:
    value = flags.FLAGS[name].value
    if value < 1:
      raise UserError(f"--{name} must be >= 1, got {value}")


# ---- Config files --------------------------------------------------------------------------------

def load_config(spec: str, overrides: Sequence[tuple[str, str]] = ()
                ) -> ml_collections.ConfigDict:
  """``get_config(ARG)`` of ``FILE[:ARG]`` with ``overrides`` applied, locked (a later typo is an
  error too). Every failure is a UserError naming the file, key or value."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"--config={spec}: {path} is not a file")
  try:
    module_spec = importlib.util.spec_from_file_location(
        "ppow_config_" + os.path.basename(path)[:-3].replace(".", "_"), path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
  except UserError:
    raise
  except Exception as e:  # a broken config file: name it and the cause, in one line
    raise UserError(f"--config={spec}: {type(e).__name__}: {e}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f"--config={spec}: get_config() returned {type(config).__name__}, not a "
                    f"ConfigDict")
  for key, raw in overrides:
    override(config, key, raw)
  config.lock()
  return config


def _parse(raw: str, current: Any, key: str) -> Any:
  if isinstance(current, str):
    return raw
  if isinstance(current, bool):
    if raw.lower() not in ("true", "false", "1", "0"):
      raise UserError(f"--config.{key}={raw}: expected true or false")
    return raw.lower() in ("true", "1")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    raise UserError(f"--config.{key}={raw}: not a {type(current).__name__}") from None
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(current, (tuple, list)):
    value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
  if current is not None and not isinstance(value, type(current)):
    raise UserError(f"--config.{key}={raw}: expected a {type(current).__name__} like "
                    f"{current!r}")
  return value


def override(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
  """Sets the dotted ``key`` from its command-line text, typed like the value it replaces."""
  node, parts = config, key.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = ".".join(parts[:i]) or "the config"
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      raise UserError(f"--config.{key}: unknown key {'.'.join(parts[:i + 1])!r} (keys of "
                      f"{where}: {', '.join(known)})")
    if i < len(parts) - 1:
      node = node[part]
  current = node[parts[-1]]
  if isinstance(current, ml_collections.ConfigDict):
    raise UserError(f"--config.{key}: a group of settings, not one value")
  node[parts[-1]] = _parse(raw, current, key)


def define_config_flag(name: str = "config") -> None:
  flags.DEFINE_string(name, None, "Config file, configs/*.py[:ARG]; override single values "
                      f"with --{name}.KEY=VALUE (e.g. --{name}.ppow.steps=50).")


def config_from_flags(name: str = "config") -> ml_collections.ConfigDict:
  spec = flags.FLAGS[name].value
  if not spec:
    raise UserError(f"--{name} is required, e.g. --{name}=configs/default.py")
  return load_config(spec, _OVERRIDES)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with ``--config.KEY=VALUE`` taken out first (they are not absl flags)."""
  rest = [argv[0]]
  for arg in argv[1:]:
    if arg.startswith("--config."):
      key, eq, value = arg[len("--config."):].partition("=")
      if not eq:
        print(f"error: {arg}: write config overrides as --config.KEY=VALUE", file=sys.stderr)
        sys.exit(2)
      _OVERRIDES.append((key, value))
    else:
      rest.append(arg)
  try:
    return flags.FLAGS(rest)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


# ---- Entry points --------------------------------------------------------------------------------

def main_for(run: Callable[[list], Any]) -> Callable[[list], None]:
  """An absl ``main`` that turns ``UserError`` into ``error: ...`` and exit status 2."""

  def main(argv):
    try:
      run(argv)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  return main


def run_main(run: Callable[[list], Any], argv: Optional[list[str]] = None) -> None:
  """``app.run`` for a tool that takes flags only: config overrides understood, a positional
  argument or another user error one line (status 2)."""

  def flags_only(args: list[str]) -> Any:
    if len(args) > 1:
      raise UserError(f"unexpected arguments: {' '.join(args[1:])}")
    return run(args)

  app.run(main_for(flags_only), argv=argv, flags_parser=_parse_flags)
