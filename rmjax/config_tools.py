"""Config helpers shared by the command lines and the loss lab: ``key=value`` overrides parsed
exactly as ``--config.key=value`` is (ml_collections' ``config_flags``), and flattening.

Imports nothing from rmjax (the bottom of the import graph).
"""
from __future__ import annotations

from collections.abc import Mapping

from absl import flags
from ml_collections import ConfigDict, config_dict, config_flags


def override(config: ConfigDict, overrides: Mapping[str, object]) -> ConfigDict:
  """Sets dotted fields of ``config`` in place and returns it (``{"optim.lr": "1e-4"}``).

  A string is parsed by ml_collections' parser for the field's type, as ``--config.optim.lr=1e-4``
  is (``1e-4``, ``7``, ``false``, ``(2, 1, 1)``; a string field takes it as it is); a field holding
  ``None`` parses it as a Python literal (``None``, ``(1, 1, 1)``), else keeps the string. Any
  other value is assigned, with ConfigDict's type check. A ValueError names the field on an
  unknown field or a value its type refuses."""
  texts = {}
  for path, value in overrides.items():
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
      node = node.get(p) if isinstance(node, ConfigDict) else None
    if not isinstance(node, ConfigDict) or leaf not in node:
      raise ValueError(f"unknown config field {path!r}")
    if isinstance(value, str):
      if node[leaf] is None and node.get_type(leaf) is type(None):
        node[leaf] = config_dict.placeholder(object)  # ml_collections parses object as a literal
      texts[path] = value
      continue
    try:
      node[leaf] = value
    except TypeError as e:
      raise ValueError(f"config field {path!r}: cannot set {value!r} ({type(value).__name__}) "
                       f"on a field holding {node[leaf]!r}: {e}") from None
  if texts:
    argv = ["override"] + [f"--config.{path}={text}" for path, text in texts.items()]
    flag_values = flags.FlagValues()  # private: leaves the program's own flags alone
    config_flags.DEFINE_config_dict("config", config, flag_values=flag_values, lock_config=False,
                                    sys_argv=argv)
    try:
      flag_values(argv)
    except (flags.Error, TypeError, ValueError) as e:
      path = next((p for p in texts if f"--config.{p}=" in str(e)), ", ".join(texts))
      raise ValueError(f"config field {path!r}: {e}") from None
  return config


def flatten(tree: Mapping, prefix: str = "") -> dict:
  """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
  flat = {}
  for k, v in tree.items():
    flat.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
  return flat
