"""The flag reference of docs/program.md, generated from the config sections.

  python -m experiments.config.reference                  # print it
  python -m experiments.config.reference --write docs/program.md

``--write`` replaces the text between the ``<!-- flags:begin -->`` and
``<!-- flags:end -->`` lines of the file in place (the markers stay);
``tests/test_docs.py`` checks that docs/program.md holds the current text.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys

from experiments.config import SECTIONS
from experiments.config import options as options_lib

BEGIN = "<!-- flags:begin -->"
END = "<!-- flags:end -->"


def _cell(text: str) -> str:
  """``text`` as one table cell: one line, ``|`` escaped, and ``<`` escaped
  so that ``<name>`` is not read as an HTML tag."""
  return " ".join(text.split()).replace("|", r"\|").replace("<", "&lt;")


def _default_text(field: dataclasses.Field) -> str:
  """The field's default as its flag would be written (lists comma-joined,
  booleans ``true``/``false``, None empty)."""
  default = options_lib.flag_default(field)
  if default is None:
    return ""
  if isinstance(default, bool):
    return "true" if default else "false"
  if isinstance(default, (list, tuple)):
    return ",".join(map(str, default))
  return str(default)


def _code(text: str) -> str:
  """``text`` as an inline code span (empty stays empty)."""
  if not text:
    return ""
  fence = "``" if "`" in text else "`"
  pad = " " if text.startswith("`") or text.endswith("`") else ""
  return f"{fence}{pad}{text}{pad}{fence}".replace("|", r"\|")


def _summary(section: type) -> str:
  """The first paragraph of the section's docstring, on one line."""
  paragraphs = inspect.cleandoc(section.__doc__ or "").split("\n\n")
  return " ".join(paragraphs[0].split())


def _help_text(field: dataclasses.Field) -> str:
  text = field.metadata["help"]
  choices = field.metadata.get("choices")
  if field.metadata["kind"] == "enum" and choices:
    text = f"{text} One of: {', '.join(choices)}."
  return _cell(text)


def flag_reference_markdown() -> str:
  """The flag reference: per section of `SECTIONS` (in its order), a
  heading, the section's summary and a table of its flags (in field
  order). Deterministic: the same sections give the same text."""
  parts = []
  for name, section in SECTIONS.items():
    lines = [f"### {name}", "", _summary(section), "",
             "| flag | default | kind | help |", "| --- | --- | --- | --- |"]
    for field in dataclasses.fields(section):
      lines.append(f"| `--{field.name}` | {_code(_default_text(field))} "
                   f"| {field.metadata['kind']} | {_help_text(field)} |")
    parts.append("\n".join(lines) + "\n")
  return "\n".join(parts)


def _block_bounds(text: str, where: str) -> tuple[int, int]:
  """The start and end offsets of the text between the marker lines."""
  begin = text.find(BEGIN + "\n")
  end = text.find(END, begin + 1) if begin >= 0 else -1
  if begin < 0 or end < 0 or (end > 0 and text[end - 1] != "\n"):
    raise ValueError(f"{where}: expected a line {BEGIN} followed by a line "
                     f"{END}")
  return begin + len(BEGIN) + 1, end


def current_block(text: str, where: str = "the text") -> str:
  """The text between the ``flags:begin`` and ``flags:end`` lines."""
  start, end = _block_bounds(text, where)
  return text[start:end]


def replace_block(text: str, block: str, where: str = "the text") -> str:
  """``text`` with ``block`` between the ``flags:begin`` and ``flags:end``
  lines."""
  start, end = _block_bounds(text, where)
  return text[:start] + block + text[end:]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.config.reference",
      description="Print the flag reference generated from the config "
      "sections, or write it into a markdown file between "
      f"{BEGIN} and {END}.")
  parser.add_argument("--write", metavar="FILE",
                      help="replace the block between the markers of FILE")
  args = parser.parse_args(argv)
  reference = flag_reference_markdown()
  if not args.write:
    sys.stdout.write(reference)
    return 0
  with open(args.write, encoding="utf-8") as f:
    text = f.read()
  try:
    new = replace_block(text, reference, args.write)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if new != text:
    with open(args.write, "w", encoding="utf-8") as f:
      f.write(new)
  return 0


if __name__ == "__main__":
  sys.exit(main())
