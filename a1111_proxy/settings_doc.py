"""The table of settings in docs/configuration.md, generated from `Settings`.

`python -m a1111_proxy.settings_doc` (`make docs`) rewrites the part of docs/configuration.md
between the two markers below and leaves the hand-written text around it alone; `--check` only
says whether the file is stale (exit status 1). tests/unit/test_docs.py fails when it is.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import SecretStr
from pydantic.fields import FieldInfo

from a1111_proxy.settings import Settings

BEGIN = "<!-- BEGIN settings: generated from a1111_proxy/settings.py by `make docs` -->"
END = "<!-- END settings -->"
DEFAULT_PATH = Path("docs/configuration.md")
REGENERATE = "make docs (or: python -m a1111_proxy.settings_doc)"


def env_name(field: str) -> str:
    prefix = Settings.model_config.get("env_prefix") or ""
    return f"{prefix}{field}".upper()


def table() -> str:
    """One row per setting, in the order `Settings` declares them."""
    rows = ["| variable | type | default | what it does |", "|---|---|---|---|"]
    for name, info in Settings.model_fields.items():
        cells = [f"`{env_name(name)}`", kind(info), default(info), info.description or ""]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"


def kind(info: FieldInfo) -> str:
    """The accepted values: choices, or a type with its bounds."""
    annotation = info.annotation
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(f"`{choice}`" for choice in typing.get_args(annotation))
    names = {
        bool: "`true` or `false`",
        int: "integer",
        float: "number",
        str: "text",
        SecretStr: "text (secret)",
    }
    if typing.get_origin(annotation) is list:
        base = "comma-separated list"
    elif isinstance(annotation, type) and annotation in names:
        base = names[annotation]
    else:
        base = _plain(annotation)
    return " ".join([base, *bounds(info.metadata)])


def _plain(annotation: Any) -> str:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return " or ".join(_plain(arg) for arg in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def bounds(metadata: list[Any]) -> list[str]:
    found: dict[str, str] = {}
    for item in metadata:
        for attribute, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(item, attribute, None)
            if isinstance(item, annotated_types.BaseMetadata) and value is not None:
                found[sign] = _number(value)
    if ">=" in found and "<=" in found:
        return [f"{found['>=']}..{found['<=']}"]
    return [f"{sign} {value}" for sign, value in found.items()]


def default(info: FieldInfo) -> str:
    value = info.get_default(call_default_factory=True)
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, list):
        value = ",".join(_number(item) for item in value)
    if isinstance(value, bool):
        value = str(value).lower()
    if isinstance(value, int | float):
        value = _number(value)
    return f"`{value}`" if value not in ("", None) else "empty"


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def updated(text: str) -> str:
    """`text` with the table between the markers regenerated."""
    head, begin, rest = text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"the markers {BEGIN!r} and {END!r} must both be in the file")
    return f"{head}{BEGIN}\n\n{table()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m a1111_proxy.settings_doc",
        description="Regenerate the settings table in docs/configuration.md.",
    )
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text = args.path.read_text(encoding="utf-8")
    new = updated(text)
    if args.check:
        if new != text:
            print(f"{args.path} is stale: run {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.path.write_text(new, encoding="utf-8")
        print(f"rewrote the settings table in {args.path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
