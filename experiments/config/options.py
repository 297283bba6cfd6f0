"""The machinery of config sections: `option` fields, their flags and their
parsing.

A section is a frozen dataclass of `option` fields (`Section`). Each field
carries its help text, its kind and its choices, from which
`experiments.config` defines the absl flag and parses its value: a setting
is declared once, in its section.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable

from absl import flags

# kind -> (absl definer, value of the flag -> value of the field). The flag
# of a list kind is a comma-separated absl list; ``json`` is a JSON object
# string; ``kwargs`` a list of name=number items.
KINDS = ("str", "str_or_none", "enum", "int", "float", "bool", "strs", "ints",
         "floats", "json", "kwargs")
_DEFINERS = {"str": "DEFINE_string", "str_or_none": "DEFINE_string",
             "enum": "DEFINE_enum", "int": "DEFINE_integer",
             "float": "DEFINE_float", "bool": "DEFINE_boolean",
             "strs": "DEFINE_list", "ints": "DEFINE_list",
             "floats": "DEFINE_list", "json": "DEFINE_string",
             "kwargs": "DEFINE_list"}


def option(default, kind: str, help: str, *, choices=None):  # noqa: A002
  """A section field: its default, its flag's kind (`KINDS`), its help text
  and, for ``kind="enum"``, its choices."""
  if kind not in KINDS:
    raise ValueError(f"option kind {kind!r}: expected one of {KINDS}")
  if (kind == "enum") != (choices is not None):
    raise ValueError("option: choices go with kind='enum' and only with it")
  return dataclasses.field(default=default, metadata={
      "kind": kind, "help": help,
      "choices": tuple(choices) if choices is not None else None})


class Section:
  """Base of the config sections: ``validate()`` checks the values of the
  section's own fields (rules that span sections or depend on the mode live
  in `experiments.config.check_across`)."""

  def validate(self) -> None:
    pass

  @classmethod
  def options(cls) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(cls)


def check(ok: bool, flag: str, value, expected: str) -> None:
  """Raises ``ValueError("<flag>=<value>: expected <expected>")`` unless
  ``ok``."""
  if not ok:
    raise ValueError(f"{flag}={value}: expected {expected}")


def one_of(section, name: str, choices) -> None:
  """Checks that field ``name`` of ``section`` is among ``choices``."""
  check(getattr(section, name) in choices, f"--{name}", getattr(section, name),
        f"one of: {', '.join(choices)}")


def _parse_list(flag: str, items, convert, what: str) -> tuple:
  try:
    return tuple(convert(x) for x in items)
  except ValueError:
    raise ValueError(f"{flag}: expected comma-separated {what}; got "
                     f"{','.join(items)!r}") from None


def floats(flag: str, items) -> tuple[float, ...]:
  return _parse_list(flag, items, float, "numbers")


def ints(flag: str, items) -> tuple[int, ...]:
  return _parse_list(flag, items, int, "integers")


def parse_json_kwargs(flag: str, text: str) -> tuple[tuple[str, Any], ...]:
  """``'{"hidden_sizes": [512, 512]}'`` -> sorted ``(key, value)`` pairs."""
  if not text:
    return ()

  def not_json(constant):  # Python's json reads NaN and Infinity.
    raise ValueError(f"{flag}: {constant} in {text!r} is not JSON; expected "
                     "finite numbers")

  try:
    value = json.loads(text, parse_constant=not_json)
  except json.JSONDecodeError as e:
    raise ValueError(f"{flag}: expected a JSON object such as "
                     f"'{{\"hidden_sizes\": [256, 256]}}'; got {text!r} "
                     f"({e.msg})") from None
  if not isinstance(value, dict):
    raise ValueError(f"{flag}: expected a JSON object; got {text!r}")
  return tuple(sorted((k, _freeze(v)) for k, v in value.items()))


def _freeze(v):
  return tuple(_freeze(x) for x in v) if isinstance(v, list) else v


def parse_loss_kwargs(items: list[str], flag: str = "--loss_kwargs"
                      ) -> tuple[tuple[str, float], ...]:
  """``["beta=0.5"]`` -> ``(("beta", 0.5),)``."""
  out = []
  for item in items or ():
    key, sep, value = item.partition("=")
    try:
      if not sep or not key:
        raise ValueError
      out.append((key.strip(), float(value)))
    except ValueError:
      raise ValueError(f"{flag}: expected name=number items such as "
                       f"beta=0.5; got {item!r}") from None
  return tuple(sorted(out))


_CONVERTERS: dict[str, Callable[[str, Any], Any]] = {
    "str_or_none": lambda flag, v: v or None,
    "strs": lambda flag, v: tuple(v),
    "ints": ints,
    "floats": floats,
    "json": parse_json_kwargs,
    "kwargs": lambda flag, v: parse_loss_kwargs(v, flag),
}


def from_flag(field: dataclasses.Field, value, flag: str | None = None):
  """The field's value from its absl flag's parsed ``value`` (``flag``
  names it in errors; default ``--<name>``)."""
  convert = _CONVERTERS.get(field.metadata["kind"])
  return convert(flag or f"--{field.name}", value) if convert else value


def flag_default(field: dataclasses.Field):
  """The absl default of the field's flag (the field's default, written as
  the flag would be)."""
  kind, default = field.metadata["kind"], field.default
  if kind == "json":
    return json.dumps(dict(default)) if default else ""
  if kind == "kwargs":
    return [f"{k}={v}" for k, v in default]
  if kind in ("strs", "ints", "floats"):
    return [str(x) for x in default]
  return default


def define_flag(field: dataclasses.Field, flag_values: flags.FlagValues
                ) -> None:
  """Defines the absl flag of one section field in ``flag_values``."""
  meta = field.metadata
  define = getattr(flags, _DEFINERS[meta["kind"]])
  args = (field.name, flag_default(field))
  if meta["kind"] == "enum":
    args += (list(meta["choices"]),)
  define(*args, meta["help"], flag_values=flag_values)


def to_json_value(field: dataclasses.Field, value):
  """The field's value as JSON data (options as objects, tuples as
  lists)."""
  if field.metadata["kind"] in ("json", "kwargs"):
    return {k: _thaw(v) for k, v in value}
  return _thaw(value)


def _thaw(v):
  return [_thaw(x) for x in v] if isinstance(v, tuple) else v


def check_numbers(section) -> None:
  """Every number of every field: finite and non-negative (no flag means
  anything at NaN, infinity or a negative value), integers below 2**31
  (steps, sizes and seeds are int32 on the device). Runs after the
  particular checks have had their say."""
  for field in dataclasses.fields(section):
    value = getattr(section, field.name)
    if field.metadata.get("kind") in ("json", "kwargs"):
      # Options named by the user: the losses and models check their
      # signs; none of them means anything at NaN or infinity.
      items = [(f"{k}={v}", v) for k, v in value
               if isinstance(v, (int, float)) and not isinstance(v, bool)]
      for text, v in items:
        check(math.isfinite(v), f"--{field.name}", text, "finite numbers")
      continue
    values = value if isinstance(value, tuple) else (value,)
    shown = (",".join(map(str, value)) if isinstance(value, tuple)
             else value)
    for v in values:
      if isinstance(v, bool) or not isinstance(v, (int, float)):
        continue
      if isinstance(v, int):
        check(0 <= v < 2**31, f"--{field.name}", shown,
              "a non-negative integer below 2**31 = 2147483648"
              if isinstance(value, int) else
              "non-negative integers below 2**31 = 2147483648")
      else:
        check(math.isfinite(v) and v >= 0, f"--{field.name}", shown,
              "a finite, non-negative number"
              if isinstance(value, float) else
              "finite, non-negative numbers")
