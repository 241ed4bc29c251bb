"""Where a setting's value comes from when the file does not spell it out.

Any string may hold ``${VAR}``, ``${VAR:-default}`` and ``${file:PATH}``
(nestable; ``$${`` is a literal ``${``). A secret key ``k`` may instead be
given as ``k_file: PATH`` (the file's text) or ``k_command: [PROGRAM, ARG...]``
(what the program prints), so that secrets stay out of the file and out of the
environment of the programs authproxy serves: the variables a secret is read
from are recorded (``Config.secret_env``), and ``authproxy exec`` removes them
from its command's environment.

:class:`SecretLoader` is :class:`authproxy.settings.SectionLoader` with these
sources; the rules themselves (:func:`interpolate`, :func:`read_secret_file`,
:func:`run_secret_command`) are plain functions, used by the schemes too.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
from pathlib import Path
from typing import Any, Mapping

import yaml

from authproxy.settings import INVALID, SectionLoader, resolve_path

_VAR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VAR_REF_RE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")  # ${VAR}, ${VAR:-...}, nested too


def interpolate(text: str, env: Mapping[str, str], base_dir: Path) -> str:
    """Expand ``${VAR}``, ``${VAR:-default}`` and ``${file:PATH}`` (nestable); ``$${`` is a literal ``${``."""
    if "$" not in text:
        return text
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text.startswith("$${", i):
            out.append("${")
            i += 3
            continue
        if text.startswith("${", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("${", j):
                    depth += 1
                    j += 2
                    continue
                if text[j] == "}":
                    depth -= 1
                j += 1
            if depth:
                raise ValueError("unterminated ${...}")
            out.append(_expand(text[i + 2 : j - 1], env, base_dir))
            i = j
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def _expand(expr: str, env: Mapping[str, str], base_dir: Path) -> str:
    if expr.startswith("file:"):
        path = interpolate(expr[5:], env, base_dir)
        return read_secret_file(path, base_dir)
    name, sep, default = expr.partition(":-")
    if not _VAR_RE.fullmatch(name):
        raise ValueError(f"bad variable reference ${{{name}}}")
    if name in env and (env[name] != "" or not sep):
        return env[name]
    if sep:
        return interpolate(default, env, base_dir)
    raise ValueError(f"environment variable {name} is not set")


def read_secret_file(path: str, base_dir: Path) -> str:
    p = resolve_path(path, base_dir)
    try:
        return p.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as e:
        raise ValueError(f"cannot read file {p}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"file {p} is not UTF-8 text") from None


def run_secret_command(argv: tuple[str, ...] | list[str], base_dir: Path, env: Mapping[str, str] | None = None, *, timeout: float) -> str:
    """A ``k_command`` secret: run without a shell (in the config file's folder); its
    standard output, trailing newline stripped, is the value. A failure names the
    program, its exit status and the last line of its standard error, never its
    standard output. Past ``timeout`` seconds it is killed, its children too."""
    prog = argv[0]
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=base_dir,
            env=dict(os.environ if env is None else env),
            start_new_session=True,  # a timeout kills the command's children too
        )
    except FileNotFoundError:
        raise ValueError(f"command {prog} not found") from None
    except OSError as e:
        raise ValueError(f"cannot run command {prog}: {e.strerror or e}") from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
        try:
            proc.communicate(timeout=2)
        except subprocess.TimeoutExpired:  # pragma: no cover - a pipe held open elsewhere
            pass
        raise ValueError(f"command {prog} did not finish within {timeout:g} s") from None
    lines = [ln.strip() for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
    last = f": {lines[-1][:300]}" if lines else ""
    if proc.returncode != 0:
        rc = proc.returncode
        status = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
        raise ValueError(f"command {prog} failed ({status}){last}")
    try:
        value = out.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ValueError(f"command {prog} printed something that is not UTF-8 text") from None
    if not value:
        raise ValueError(f"command {prog} printed nothing{last}")
    return value


class SecretLoader(SectionLoader):
    """A :class:`SectionLoader` whose strings are interpolated from ``env`` and whose
    secrets may come from files and commands; ``secret_env`` collects the names of
    the variables the secrets were read from."""

    def __init__(self, path: str, env: Mapping[str, str], command_timeout: float) -> None:
        super().__init__(path)
        self.env = env
        self.command_timeout = command_timeout  # seconds a k_command may take
        self.secret_env: set[str] = set()
        self.sources: list[str] = []  # key paths of the k_file / k_command secrets read (or tried)
        # Failed reads that tolerate() charged to their owner (a service): owner → why.
        self.unreadable: dict[str, str] = {}

    def tolerate(self, keypath: str) -> str | None:
        """Whom a failed read of the secret at ``keypath`` may be charged to instead of
        making the whole file invalid (None: it is an error, the default). A running
        proxy that re-reads its file says: the service it belongs to, which then goes
        to ``error`` alone while every other service carries on."""
        return None

    def _unreadable(self, node: yaml.Node, keypath: str, message: str) -> Any:
        owner = self.tolerate(keypath)
        if owner is None:
            self.err(node, keypath, message)
            return INVALID
        self.unreadable.setdefault(owner, f"{keypath}: {message}")
        # A random stand-in keeps the rest of the owner's settings readable (its routes,
        # its upstream); it is never sent anywhere, and never equal to a real value.
        return "unreadable-" + secrets.token_hex(16)

    def expand(self, text: str) -> str:
        return interpolate(text, self.env, self.base_dir)

    def note_secret_env(self, node: yaml.Node) -> None:
        """Remember the variables a secret's value, file path or command refers to."""
        if isinstance(node, yaml.ScalarNode) and isinstance(node.value, str):
            self.secret_env.update(_VAR_REF_RE.findall(node.value))
        for item in node.value if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)) else ():
            for sub in item if isinstance(item, tuple) else (item,):
                self.note_secret_env(sub)

    def secret_source(self, key: str, vnode: yaml.Node, kp: str) -> Any:
        """The text of a ``k_file`` or ``k_command`` secret, or INVALID (the error said)."""
        self.note_secret_env(vnode)
        self.sources.append(kp)
        if key.endswith("_command"):
            if not isinstance(vnode, yaml.SequenceNode) or not vnode.value:
                self.err(vnode, kp, "expected a list [PROGRAM, ARG...] (run without a shell)")
                return INVALID
            argv = self.convert(tuple[str, ...], vnode, kp)
            if argv is INVALID:
                return INVALID
            env = self.env if self.env is os.environ else {**os.environ, **self.env}
            try:
                return run_secret_command(argv, self.base_dir, env, timeout=self.command_timeout)
            except ValueError as e:
                return self._unreadable(vnode, kp, str(e))
        path = self.scalar(vnode, kp)
        if path is INVALID:
            return INVALID
        if not isinstance(path, str):
            self.err(vnode, kp, "expected a file path")
            return INVALID
        try:
            return read_secret_file(path, self.base_dir)
        except ValueError as e:
            return self._unreadable(vnode, kp, str(e))
