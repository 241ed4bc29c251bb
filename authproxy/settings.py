"""A YAML settings document → frozen dataclasses: the generic reader.

A section of the file is declared once, as a frozen dataclass (the product's in
:mod:`authproxy.config`, a scheme's in the scheme's own module), and
:class:`SectionLoader` reads it by walking its fields, so that every section
gets the same treatment: typed values, defaults, ``required``, unknown keys
and keys given twice rejected, a section's own ``check()``, and every error
naming the file, the line and the key path.
Errors are collected rather than raised at the first one, so that one run of
``authproxy check`` shows everything that is wrong.

Where a value comes from when the file does not spell it out (``${VAR}``,
``${file:PATH}``, a secret's ``k_file`` / ``k_command``) is not this module's
business: it leaves hooks (:meth:`SectionLoader.expand`,
:meth:`SectionLoader.secret_source`, :meth:`SectionLoader.note_secret_env`)
that :mod:`authproxy.secrets_source` fills. This module imports nothing of
authproxy but :mod:`authproxy.secret`, so that a scheme can declare its
settings without importing the product's configuration.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from authproxy.secret import Secret


class ConfigError(Exception):
    """A configuration that cannot be used. ``str()`` lists every problem, one a line."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


class FieldError(Exception):
    """Raised by a section's ``check()`` to blame one of its keys (``index``: one item of a list)."""

    def __init__(self, key: str | None, message: str, index: int | None = None) -> None:
        self.key = key
        self.message = message
        self.index = index
        super().__init__(message)


class FilePath(str):
    """A path to a file that must exist; relative paths are taken from the config file's folder."""


def resolve_path(path: str, base_dir: Path) -> Path:
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else base_dir / p


def key_lines(content: str) -> list[str]:
    """A keys file or command output: one key a line; blank lines and # comments ignored."""
    lines = [ln.strip() for ln in content.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


class _Invalid:
    def __repr__(self) -> str:
        return "<invalid>"


# A value that could not be read: its error is already recorded, and the section
# that holds it is invalid too (without a second error for it).
INVALID: Any = _Invalid()
_CONSTRUCTOR = yaml.SafeLoader("")


# --------------------------------------------------------------------------- the loader


class SectionLoader:
    """Reads YAML nodes into section dataclasses, recording every error in ``errors``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.base_dir = Path(path).resolve().parent if path != "<string>" else Path.cwd()
        self.errors: list[str] = []

    # ---- hooks (authproxy.secrets_source.SecretLoader fills them)
    def expand(self, text: str) -> str:
        """A string value as the file gives it, expanded; a ValueError is the key's error."""
        return text

    def note_secret_env(self, node: yaml.Node) -> None:
        """Told of every node a secret's value comes from."""

    def secret_source(self, key: str, vnode: yaml.Node, kp: str) -> Any:
        """The text of a secret given as ``k_file`` or ``k_command``, or INVALID (the error said)."""
        self.err(vnode, kp, "unknown key")
        return INVALID

    # ---- error helpers
    def err(self, node: yaml.Node | None, keypath: str, message: str) -> None:
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        self.errors.append(f"{self.path}{line}: {keypath}: {message}" if keypath else f"{self.path}{line}: {message}")

    # ---- scalars
    def scalar(self, node: yaml.Node, keypath: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            self.err(node, keypath, "expected a single value")
            return INVALID
        value = _CONSTRUCTOR.construct_object(node)
        if isinstance(value, str):
            try:
                return self.expand(value)
            except ValueError as e:
                self.err(node, keypath, str(e))
                return INVALID
        return value

    def convert(self, tp: Any, node: yaml.Node, keypath: str) -> Any:
        if _strip_optional(tp) is Secret:
            self.note_secret_env(node)
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            inner = [a for a in args if a is not type(None)]
            if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
                return None
            if isinstance(node, yaml.SequenceNode):  # "one or a list" (str | tuple[str, ...]): the list form
                inner = [a for a in inner if typing.get_origin(a) is tuple] or inner
            return self.convert(inner[0], node, keypath)
        if origin is tuple:
            if not isinstance(node, yaml.SequenceNode):
                self.err(node, keypath, "expected a list")
                return INVALID
            items = [self.convert(args[0], item, f"{keypath}[{i}]") for i, item in enumerate(node.value)]
            return INVALID if any(x is INVALID for x in items) else tuple(items)
        if origin is dict:
            if not isinstance(node, yaml.MappingNode):
                self.err(node, keypath, "expected a mapping")
                return INVALID
            out = {}
            for knode, vnode in node.value:
                key = self.scalar(knode, keypath)
                if not isinstance(key, str):
                    self.err(knode, keypath, "keys must be strings")
                    continue
                out[key] = self.convert(args[1], vnode, f"{keypath}.{key}")
            return INVALID if any(v is INVALID for v in out.values()) else out
        if origin is Literal:
            value = self.scalar(node, keypath)
            if value is INVALID:
                return value
            if value not in args:
                self.err(node, keypath, f"must be one of {', '.join(map(str, args))}")
                return INVALID
            return value
        if dataclasses.is_dataclass(tp):
            return self.section(tp, node, keypath)
        value = self.scalar(node, keypath)
        if value is INVALID:
            return value
        return self.coerce(tp, value, node, keypath)

    def coerce(self, tp: Any, value: Any, node: yaml.Node, keypath: str) -> Any:
        try:
            if tp is bool:
                if isinstance(value, bool):
                    return value
                if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                    return value.lower() in ("true", "yes", "on", "1")
                raise ValueError("expected true or false")
            if tp is int:
                if isinstance(value, bool):
                    raise ValueError("expected an integer")
                if isinstance(value, int):
                    return value
                if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
                    return int(value)
                raise ValueError("expected an integer")
            if tp is float:
                if isinstance(value, bool):
                    raise ValueError("expected a number")
                if isinstance(value, (int, float)):
                    return float(value)
                if isinstance(value, str):
                    return float(value)
                raise ValueError("expected a number")
            if tp in (str, FilePath, Secret):
                if value is None:
                    raise ValueError("expected a value")
                if isinstance(value, (dict, list)):
                    raise ValueError("expected a string")
                text = value if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
                if tp is Secret:
                    return Secret(text)
                if tp is FilePath:
                    p = resolve_path(text, self.base_dir)
                    if not p.is_file():
                        raise ValueError(f"file {p} does not exist")
                    if not os.access(p, os.R_OK):
                        raise ValueError(f"file {p} is not readable")
                    return FilePath(str(p))
                return text
        except ValueError as e:
            self.err(node, keypath, str(e) if "expected" in str(e) or "file" in str(e) else "expected a number")
            return INVALID
        raise TypeError(f"unsupported config type {tp!r}")  # a programming error

    # ---- sections
    def section(self, cls: type, node: yaml.Node, keypath: str, skip: tuple[str, ...] = ()) -> Any:
        """One dataclass from a mapping. A secret field ``k`` may also be given as
        ``k_file`` or ``k_command`` (:meth:`secret_source`); a field whose metadata
        names a ``load`` method is read by that method of the loader."""
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            node = yaml.MappingNode("tag:yaml.org,2002:map", [], node.start_mark, node.end_mark)
        if not isinstance(node, yaml.MappingNode):
            self.err(node, keypath, "expected a mapping")
            return INVALID
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        given: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for knode, vnode in node.value:
            key = knode.value if isinstance(knode, yaml.ScalarNode) else None
            if not isinstance(key, str):
                self.err(knode, keypath, "keys must be strings")
                continue
            if key in given:
                self.err(knode, join_keypath(keypath, key), "given twice")
                continue
            given[key] = (knode, vnode)
        values: dict[str, Any] = {}
        bad = False
        custom = {n: f.metadata["load"] for n, f in fields.items() if "load" in f.metadata}
        for key, (knode, vnode) in given.items():
            if key in skip:
                continue
            kp = join_keypath(keypath, key)
            name, _ = _source_of(key)
            if key in custom or name in custom:
                continue  # below
            if name in fields and key not in fields and _is_secret(hints[name]):
                forms = [k for k in (name, f"{name}_file", f"{name}_command") if k in given]
                if len(forms) > 1:
                    if key == next(k for k in forms if k != name and k not in fields):  # said once
                        either = f"either {forms[0]} or {forms[1]}, not both" if len(forms) == 2 else f"only one of {', '.join(forms)}"
                        self.err(knode, kp, f"give {either}")
                    bad = True
                    continue
                content = self.secret_source(key, vnode, kp)
                if content is INVALID:
                    bad = True
                elif typing.get_origin(_strip_optional(hints[name])) is tuple:
                    values[name] = tuple(Secret(ln) for ln in key_lines(content))
                else:
                    values[name] = Secret(content)
                continue
            if key not in fields:
                self.err(knode, kp, "unknown key")
                bad = True
                continue
            value = self.convert(hints[key], vnode, kp)
            if value is INVALID:
                bad = True
            else:
                values[key] = value
        for name, method in custom.items():
            parts = {k: given[k] for k in (name, f"{name}_file", f"{name}_command") if k in given and k not in skip}
            if parts:
                value = getattr(self, method)(parts, keypath)
                if value is INVALID:
                    bad = True
                else:
                    values[name] = value
        for name, f in fields.items():
            if name in values or name in skip:
                continue
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
                if not bad:
                    self.err(node, join_keypath(keypath, name), "required")
                bad = True
        if bad:
            return INVALID
        try:
            obj = cls(**values)
            check = getattr(obj, "check", None)
            if check is not None:
                check()
        except FieldError as e:
            where = given.get(e.key, (None, node))[1] if e.key else node
            key = e.key
            if e.index is not None and key:
                key = f"{key}[{e.index}]"
                if isinstance(where, yaml.SequenceNode) and e.index < len(where.value):
                    where = where.value[e.index]
            self.err(where, join_keypath(keypath, key) if key else keypath, e.message)
            return INVALID
        return obj


# --------------------------------------------------------------------------- node helpers


def join_keypath(keypath: str, key: str | None) -> str:
    return f"{keypath}.{key}" if keypath and key else (key or keypath)


def child_node(node: yaml.Node | None, key: str) -> yaml.Node | None:
    """The value node of ``key`` in a mapping node (None: not a mapping, or no such key)."""
    if not isinstance(node, yaml.MappingNode):
        return None
    return next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key), None)


def line_suffix(node: yaml.Node | None) -> str:
    """``:LINE`` of a node, for an error message after the file name ('' without a node)."""
    return f":{node.start_mark.line + 1}" if node is not None else ""


def _source_of(key: str) -> tuple[str, str | None]:
    """``token_file`` → (token, file); ``token_command`` → (token, command); else (key, None)."""
    for suffix in ("_file", "_command"):
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], suffix[1:]
    return key, None


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _is_secret(tp: Any) -> bool:
    tp = _strip_optional(tp)
    if tp is Secret:
        return True
    return typing.get_origin(tp) is tuple and typing.get_args(tp)[0] is Secret
