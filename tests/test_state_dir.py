"""The state dir is private whatever the umask: the state dir itself and every folder
authproxy creates for it are 0700, every file 0600; parents that existed before
(~/.local) are left as they were."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from authproxy.config import load_config_text
from authproxy.state import StateDir


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_fresh_nested_state_dir_is_0700_all_the_way_down(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    root = tmp_path / "a" / "b" / "state"
    with umask(0o022):
        StateDir(root).service("svc").put("credentials", {"x": 1})
    for d in (tmp_path / "a", tmp_path / "a" / "b", root, root / "svc"):
        assert mode(d) == 0o700, f"{d} is {oct(mode(d))}"
    assert mode(root / "svc" / "credentials.json") == 0o600
    assert mode(tmp_path) == 0o755  # existed before: not ours to change


async def test_a_lock_taken_first_makes_the_state_dir_private_too(tmp_path: Path) -> None:
    from authproxy.store.statedir import StateDirStore

    root = tmp_path / "fresh" / "state"
    with umask(0o022):
        async with StateDirStore(str(root)).service("svc").lock("refresh"):
            pass
    assert mode(tmp_path / "fresh") == mode(root) == mode(root / "svc") == 0o700
    assert mode(root / "svc" / ".refresh.lock") == 0o600


def test_an_existing_state_dir_made_0755_is_made_0700(tmp_path: Path) -> None:
    """systemd's StateDirectory= (and a hand-made folder) starts out 0755."""
    root = tmp_path / "var-lib-authproxy"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    (root / "svc").mkdir()
    os.chmod(root / "svc", 0o755)
    with umask(0o022):
        StateDir(root).service("svc").put("app_token", {"x": 1})
        StateDir(root).service("other").put("credentials", {"x": 1})
    assert mode(root) == mode(root / "svc") == mode(root / "other") == 0o700
    assert mode(root / "svc" / "app_token.json") == mode(root / "other" / "credentials.json") == 0o600


def test_state_dir_ensure_creates_it_private(tmp_path: Path) -> None:
    from authproxy.state import StateError

    with umask(0o022):
        path = StateDir(tmp_path / "p" / "q").ensure()
    assert mode(path) == mode(tmp_path / "p") == 0o700
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StateError, match="cannot use the state dir"):
        StateDir(tmp_path / "file").ensure()


def test_the_default_state_dir_is_private_and_existing_parents_are_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / ".local").mkdir(parents=True)
    os.chmod(home, 0o751)
    os.chmod(home / ".local", 0o755)
    monkeypatch.setenv("HOME", str(home))
    doc = {"services": {"s": {"upstream": "http://127.0.0.1:1", "auth": {"scheme": "bearer", "token": "t0ken-value"}}}}
    cfg = load_config_text(yaml.safe_dump(doc), env={})
    assert Path(cfg.state_dir) == home / ".local" / "state" / "authproxy"
    with umask(0o022):
        StateDir(cfg.state_dir).service("s").put("credentials", {"x": 1})
    assert mode(home / ".local" / "state") == 0o700  # created by authproxy
    assert mode(home / ".local" / "state" / "authproxy") == 0o700
    assert mode(home / ".local" / "state" / "authproxy" / "s") == 0o700
    assert mode(home / ".local") == 0o755 and mode(home) == 0o751  # existed: left alone
