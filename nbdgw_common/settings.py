"""Config keys declared once (issue 19; ceph-iscsi's ``gateway_setting.py``).

Each key of the node config is one `Setting`: name, kind, range, default and a line of
help.  A section's keys are one `Keys` table, and from it follow the keys the section
accepts (``known``), the defaults of the frozen dataclass it is parsed into
(``max_bytes: int = default_of(JOURNAL, "max_bytes")``), the checks by kind
(gateway/config.py, ``_Section.value``) and ``nbdgw config keys``;
tests/unit/test_config_keys.py checks that examples/nbdgw.yaml documents every key.
The tables sit next to their dataclasses (gateway/config.py, iscsi_bridge/settings.py):
this module is beneath both.  Checks across keys stay code, after the keys are read.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class Kind(enum.Enum):
    """What a key holds.  The first group is read and checked by kind alone; the others
    by their section's code (a list or mapping, or a value with a parser of its own)."""

    INTEGER = "integer"
    SIZE = "size"
    SECONDS = "seconds"
    PERCENT = "percentage"
    BOOLEAN = "bool"
    STRING = "string"
    PATH = "absolute path"
    CHOICE = "choice"
    HOST_PORT = "HOST:PORT"
    # read by the section's code:
    LIST = "list"
    SECTION = "mapping"
    ADDRESS = "IP address"
    RATE = "rate"
    TEXT = "text"  # a string with its own syntax, named in the help


@dataclass(frozen=True)
class Setting:
    """One config key.  ``default`` is the parsed value (a Path, an enum member, a
    (host, port) pair); ``keys`` the table of a SECTION, or of a LIST of mappings."""

    name: str
    kind: Kind
    default: Any = None
    help: str = ""
    minimum: int | float | None = None
    maximum: int | float | None = None
    choices: type[enum.Enum] | None = None  # CHOICE: the default's enum unless given
    required: bool = False
    keys: Keys | None = None
    shown_default: str | None = None  # a default computed on the host (its name)

    def __post_init__(self) -> None:
        if self.kind is Kind.CHOICE and self.choices is None:
            if not isinstance(self.default, enum.Enum):
                raise TypeError(f"setting {self.name}: CHOICE needs choices or an enum default")
            object.__setattr__(self, "choices", type(self.default))

    def type_text(self) -> str:
        """The kind with its range, as `nbdgw config keys` shows it."""
        if self.kind is Kind.CHOICE:
            assert self.choices is not None
            return " | ".join(str(m.value) for m in self.choices)
        text = str(self.kind.value)
        show = size_text if self.kind is Kind.SIZE else str
        lo = None if self.minimum is None else show(self.minimum)
        hi = None if self.maximum is None else show(self.maximum)
        if lo is not None and lo == hi:
            return f"{text} {lo}"
        if lo is not None and hi is not None:
            return f"{text} {lo}..{hi}"
        if lo is not None:
            return f"{text} >= {lo}"
        if hi is not None:
            return f"{text} <= {hi}"
        return text

    def default_text(self) -> str:
        """The default as the config would write it."""
        v = self.default
        if self.required or self.shown_default is not None or v is None:
            return "required" if self.required else str(self.shown_default or "none")
        if self.kind is Kind.HOST_PORT:
            host, port = v
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return _value_text(v, self.kind)


class Keys:
    """The keys of one section (a mapping of the config), in documentation order."""

    def __init__(self, *settings: Setting) -> None:
        self._by_name = {s.name: s for s in settings}
        if len(self._by_name) != len(settings):
            raise ValueError("a key is declared twice")

    @property
    def known(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def __getitem__(self, name: str) -> Setting:
        return self._by_name[name]

    def get(self, name: str) -> Setting | None:
        return self._by_name.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Setting]:
        return iter(self._by_name.values())



def default_of(keys: Keys, name: str) -> Any:
    """The declared default of key ``name``: a dataclass field's default
    (``port: int = default_of(PEER, "port")``; a name not declared fails the import)."""
    return keys[name].default


def _value_text(v: Any, kind: Kind) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, enum.Enum):
        return str(v.value)
    if kind is Kind.SIZE:
        return size_text(int(v))
    if isinstance(v, tuple | list):
        return "[" + ", ".join(str(x) for x in v) + "]"
    if isinstance(v, Path | str | int | float):
        return str(v)
    raise TypeError(f"no text for a default {v!r}")


def walk(keys: Keys, path: str = "") -> Iterator[tuple[str, Setting]]:
    """Every key under ``keys`` with its dotted path (``peers[].port``), depth first."""
    for s in keys:
        where = f"{path}.{s.name}" if path else s.name
        yield where, s
        if s.keys is not None:
            yield from walk(s.keys, f"{where}[]" if s.kind is Kind.LIST else where)


def describe(keys: Keys) -> list[str]:
    """One line per key under ``keys``: dotted path, type and range, default, help."""
    rows = [(path, s.type_text(), s.default_text(), s.help) for path, s in walk(keys)
            if s.kind is not Kind.SECTION]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows if len(r[1]) <= 24)
    w2 = max(len(r[2]) for r in rows if len(r[2]) <= 20)
    return [f"{p:<{w0}}  {t:<{w1}}  {d:<{w2}}  {h}".rstrip() for p, t, d, h in rows]


_UNITS = ((50, "P"), (40, "T"), (30, "G"), (20, "M"), (10, "K"))


def size_text(n: float) -> str:
    """Bytes as the config writes a size: the largest binary unit that divides it."""
    n = int(n)
    for shift, unit in _UNITS:
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)
