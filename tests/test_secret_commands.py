"""``k_command`` (and ``k_file``) secrets while the proxy runs: read again when the
upstream rejects what they built (at most once a minute per service), a failing
read puts the one service in ``error`` (exit status and stderr's last line,
never stdout), SIGHUP reads them again, ``authproxy check`` runs each once.

Every command is a real program: ``sys.executable`` running a script written
here, which prints what the ``token`` file beside it holds (or fails while a
``fail`` file exists) and appends a line to ``runs`` each time it is run.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from authproxy.config import ConfigError, load_config
from authproxy.proxy.app import ProxyServer
from authproxy.proxy.reread import Unreadable
from tests.conftest import RunningProxy, free_port, run_cli, secret, wait_for, write_config

STDOUT_MARKER = secret("stdout-of-a-failing-command-5e1f")  # printed by the failing command: shown nowhere
SCRIPT = f"""\
import pathlib, sys
here = pathlib.Path(__file__).parent
with open(here / "runs", "a") as f:
    f.write((sys.argv[1] if len(sys.argv) > 1 else "run") + "\\n")
if (here / "fail").exists():
    print({STDOUT_MARKER!r})
    print("first line of stderr", file=sys.stderr)
    print("vault: permission denied", file=sys.stderr)
    sys.exit(3)
print((here / "token").read_text().strip())
"""


class Secrets:
    """The command's folder: what it prints, whether it fails, how often it ran."""

    def __init__(self, root: Path, first: str) -> None:
        self.dir = root / "cmd"
        self.dir.mkdir()
        (self.dir / "cmd.py").write_text(SCRIPT)
        self.set(first)

    @property
    def argv(self) -> list[str]:
        return [sys.executable, str(self.dir / "cmd.py")]

    def set(self, token: str) -> None:
        (self.dir / "token").write_text(secret(token) + "\n")

    def fail(self, on: bool = True) -> None:
        flag = self.dir / "fail"
        flag.touch() if on else flag.unlink()

    @property
    def runs(self) -> int:
        path = self.dir / "runs"
        return len(path.read_text().splitlines()) if path.exists() else 0


class Upstream:
    """An API that accepts ``Authorization: Bearer T`` for the tokens in ``valid``."""

    def __init__(self, *valid: str) -> None:
        self.valid = set(valid)
        self.seen: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.seen.append(token)
        if token not in self.valid:
            return web.json_response({"message": "Bad credentials"}, status=401)
        return web.json_response({"ok": True})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


@pytest.fixture
async def running(tmp_path: Path, state_dir: Path) -> AsyncIterator[Any]:
    """Start the proxy in-process from a config *file* (a re-read reads the file)."""
    started: list[RunningProxy] = []

    async def start(config: dict[str, Any]) -> tuple[RunningProxy, Path]:
        path = write_config(tmp_path / "authproxy.yaml", {"listen": "127.0.0.1:0", "state_dir": str(state_dir), **config})
        server = ProxyServer(load_config(path))
        await server.start()
        started.append(RunningProxy(server))
        return started[-1], path

    yield start
    for rp in started:
        await rp.close()


async def get(p: RunningProxy, path: str = "/api/user") -> tuple[int, Any]:
    async with p.request("GET", path) as r:
        return r.status, await r.json(content_type=None)


def bearer_service(up: str, secrets: Secrets) -> dict[str, Any]:
    return {"upstream": up, "auth": {"scheme": "bearer", "token_command": secrets.argv}}


async def reread_done(p: RunningProxy) -> None:
    await wait_for(lambda: not p.server.rereads._tasks)


# --------------------------------------------------------------------------- a rejection reads the secret again


async def test_a_rejected_token_is_read_again_once_a_minute_and_the_next_request_carries_the_new_one(
    tmp_path: Path, upstream: Any, running: Any
) -> None:
    secrets = Secrets(tmp_path, "token-one-7c1a")
    api = Upstream("token-one-7c1a")
    p, _ = await running({"services": {"api": bearer_service(await upstream(api.app()), secrets)}})
    rereads = p.server.rereads
    assert p.server.config.services["api"].secret_sources == ("auth.token_command",)
    assert (await get(p))[0] == 200 and secrets.runs == 1

    # Rotated in the password manager; the upstream no longer takes the old one.
    secrets.set("token-two-9b4e")
    api.valid = {"token-two-9b4e"}
    status, body = await get(p)
    assert status == 401 and body == {"message": "Bad credentials"}  # the rejection is the client's answer
    await reread_done(p)
    assert secrets.runs == 2 and rereads.runs == 1
    assert (await get(p))[0] == 200
    assert api.seen == ["token-one-7c1a", "token-one-7c1a", "token-two-9b4e"]  # the rejected request was not replayed

    # Rotated again at once: within the minute the command is not run again.
    secrets.set("token-three-2d8f")
    api.valid = {"token-three-2d8f"}
    for _ in range(3):
        assert (await get(p))[0] == 401
    await reread_done(p)
    assert secrets.runs == 2 and rereads.runs == 1
    # A minute later the next rejection reads it again.
    now = time.monotonic()
    rereads.clock = lambda: now + 61
    assert (await get(p))[0] == 401
    await reread_done(p)
    assert secrets.runs == 3 and (await get(p))[0] == 200
    assert api.seen[-1] == "token-three-2d8f"


async def test_a_reread_that_finds_the_same_secret_keeps_the_runtime(tmp_path: Path, upstream: Any, running: Any) -> None:
    secrets = Secrets(tmp_path, "token-same-41aa")
    api = Upstream("token-same-41aa")
    p, _ = await running({"services": {"api": bearer_service(await upstream(api.app()), secrets)}})
    rt = p.server.runtimes["api"]
    api.valid = set()  # revoked upstream, but the password manager still holds it
    assert (await get(p))[0] == 401
    await reread_done(p)
    assert secrets.runs == 2 and p.server.runtimes["api"] is rt
    assert (await get(p))[0] == 401 and api.seen.count("token-same-41aa") == 2  # one upstream request each, no replay


# --------------------------------------------------------------------------- a failing read


async def test_a_failing_command_after_a_rejection_puts_the_service_in_error_until_a_later_read_succeeds(
    tmp_path: Path, upstream: Any, running: Any, caplog: Any
) -> None:
    secrets = Secrets(tmp_path, "token-one-c3d9")
    api = Upstream("token-one-c3d9")
    up = await upstream(api.app())
    p, _ = await running({"services": {"api": bearer_service(up, secrets), "other": {"upstream": up, "auth": {"scheme": "bearer", "token": secret("other-token-77aa")}}}})
    api.valid.add("other-token-77aa")
    secrets.fail()  # e.g. the vault session expired
    api.valid.discard("token-one-c3d9")
    assert (await get(p))[0] == 401
    await reread_done(p)
    status, ready = await p.get_json("/-/readyz")
    svc = ready["services"]["api"]
    assert status == 503 and svc["state"] == "error", ready
    assert f"command {sys.executable} failed (exit status 3): vault: permission denied" in svc["last_error"]
    assert "auth.token_command" in svc["last_error"] and "first line of stderr" not in svc["last_error"]
    assert ready["services"]["other"]["state"] == "ready"
    status, body = await get(p)
    assert status == 503 and body["error"] == "token_unavailable" and "exit status 3" in body["message"], body
    assert (await get(p, "/other/x"))[0] == 200  # the other service is untouched
    for shown in (json.dumps(ready), json.dumps(body), caplog.text):
        assert STDOUT_MARKER not in shown
    assert "secret_unreadable" in caplog.text
    n = len(api.seen)
    assert (await get(p))[0] == 503 and len(api.seen) == n  # nothing goes upstream meanwhile

    # The vault is back; the retry after the backoff, a minute after the read, reads it again.
    secrets.fail(False)
    secrets.set("token-two-e8f0")
    api.valid.add("token-two-e8f0")
    runs = secrets.runs
    now = time.monotonic()
    p.server.rereads.clock = lambda: now + 61
    creds = p.server.runtimes["api"].creds
    assert isinstance(creds.scheme, Unreadable)
    creds.health.retry_at = 0.0  # the backoff's retry is due
    assert (await get(p))[0] == 503  # that retry is refused again, and asks for a read
    await wait_for(lambda: not isinstance(p.server.runtimes["api"].scheme, Unreadable))
    assert secrets.runs == runs + 1
    await wait_for(lambda: p.server.runtimes["api"].creds.status().state == "ready")
    assert (await get(p))[0] == 200 and api.seen[-1] == "token-two-e8f0"
    assert (await p.get_json("/-/readyz"))[0] == 200


async def test_a_secret_file_that_became_unreadable_is_named(tmp_path: Path, upstream: Any, running: Any) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(secret("file-token-a1b2") + "\n")
    api = Upstream("file-token-a1b2")
    p, _ = await running({"services": {"api": {"upstream": await upstream(api.app()), "auth": {"scheme": "bearer", "token_file": str(token_file)}}}})
    assert (await get(p))[0] == 200
    token_file.unlink()
    api.valid = set()
    assert (await get(p))[0] == 401
    await reread_done(p)
    st = p.server.runtimes["api"].creds.status()
    assert st.state == "error" and f"auth.token_file: cannot read file {token_file}" in (st.last_error or "")


# --------------------------------------------------------------------------- SIGHUP, start, check (the real CLI)


async def test_sighup_runs_the_command_again_and_a_failing_one_puts_only_its_service_in_error(
    tmp_path: Path, upstream: Any, cli: Any
) -> None:
    secrets = Secrets(tmp_path, "token-one-5f60")
    api = Upstream("token-one-5f60", "plain-token-0c0c")
    up = await upstream(api.app())
    port = free_port()
    cfg = {
        "listen": f"127.0.0.1:{port}",
        "state_dir": str(tmp_path / "state"),
        "services": {"api": bearer_service(up, secrets), "plain": {"upstream": up, "auth": {"scheme": "bearer", "token": secret("plain-token-0c0c")}}},
    }
    path = write_config(tmp_path / "c.yaml", cfg)
    proc = cli("run", "-c", str(path))
    await asyncio.to_thread(proc.wait_log, "listening")
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as s:

        async def status(target: str) -> int:
            async with s.get(url + target) as r:
                return r.status

        async def ready() -> tuple[int, Any]:
            async with s.get(url + "/-/readyz") as r:
                return r.status, await r.json()

        assert await status("/api/x") == 200 and secrets.runs == 1
        secrets.set("token-two-1a2b")
        api.valid.add("token-two-1a2b")
        proc.signal(signal.SIGHUP)
        await asyncio.to_thread(proc.wait_log, "reloaded")
        assert secrets.runs == 2
        assert await status("/api/x") == 200 and api.seen[-1] == "token-two-1a2b"

        # A failing command on SIGHUP: its service goes to error, the rest of the file applies.
        secrets.fail()
        cfg["services"]["plain"]["timeout"] = {"total": 30}
        write_config(path, cfg)
        proc.signal(signal.SIGHUP)
        await asyncio.to_thread(proc.wait_log, "secret_unreadable")
        await wait_for(lambda: proc.log().count("reloaded") == 2)
        code, body = await ready()
        assert code == 503 and body["services"]["api"]["state"] == "error"
        assert "exit status 3): vault: permission denied" in body["services"]["api"]["last_error"]
        assert await status("/api/x") == 503 and await status("/plain/x") == 200
        # A later SIGHUP whose read succeeds brings it back.
        secrets.fail(False)
        proc.signal(signal.SIGHUP)
        await wait_for(lambda: proc.log().count("reloaded") == 3)

        async def served() -> bool:
            return await status("/api/x") == 200

        await wait_for(served)
        code, body = await ready()
        assert code == 200 and body["services"]["api"]["state"] == "ready", body
    proc.stop()
    assert STDOUT_MARKER not in proc.log()


def test_check_runs_each_command_once_and_run_refuses_to_start_with_a_failing_one(tmp_path: Path) -> None:
    secrets = Secrets(tmp_path, "token-check-3e3e")
    cfg = {
        "listen": "127.0.0.1:0",
        "state_dir": str(tmp_path / "state"),
        "inbound": {"keys": [{"name": "agent", "key_command": [*secrets.argv, "key"]}]},
        "services": {
            "a": {"upstream": "http://127.0.0.1:9", "auth": {"scheme": "bearer", "token_command": [*secrets.argv, "a"]}},
            "b": {"upstream": "http://127.0.0.1:9", "auth": {"scheme": "bearer", "token_command": [*secrets.argv, "b"]}},
        },
    }
    path = write_config(tmp_path / "c.yaml", cfg)
    r = run_cli("check", "-c", str(path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted((secrets.dir / "runs").read_text().split()) == ["a", "b", "key"]  # each command once
    assert "token-check-3e3e" not in r.stdout + r.stderr
    secrets.fail()
    for command in ("check", "run"):
        r = run_cli(command, "-c", str(path), cwd=tmp_path, timeout=30)
        assert r.returncode == 2, (command, r.stderr)
        assert f"services.a.auth.token_command: command {sys.executable} failed (exit status 3): vault: permission denied" in r.stderr
        assert STDOUT_MARKER not in r.stdout + r.stderr


def test_a_tolerant_load_names_the_unreadable_service_and_keeps_the_others(tmp_path: Path) -> None:
    secrets = Secrets(tmp_path, "token-load-6d6d")
    secrets.fail()
    path = write_config(
        tmp_path / "c.yaml",
        {
            "services": {
                "a": {"upstream": "http://x", "auth": {"scheme": "bearer", "token_command": secrets.argv}},
                "b": {"upstream": "http://y", "auth": {"scheme": "bearer", "token": "b"}},
            }
        },
    )
    with pytest.raises(ConfigError, match="exit status 3"):
        load_config(path)
    cfg = load_config(path, tolerant=True)
    assert set(cfg.services) == {"a", "b"} and set(cfg.unreadable) == {"a"}
    assert cfg.unreadable["a"].startswith("services.a.auth.token_command: command ")
    assert cfg.services["a"].prefix == "/a" and cfg.services["b"].secret_sources == ()
    assert STDOUT_MARKER not in cfg.unreadable["a"]
