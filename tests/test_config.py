"""The configuration file: every error names the file, the line and the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from authproxy.config import ConfigError, interpolate, load_config, load_config_text, parse_listen, parse_upstream
from authproxy.secret import Secret
from tests.conftest import run_cli


def errors_of(text: str, env: dict[str, str] | None = None, path: str = "c.yaml") -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config_text(text, env=env or {}, path=path)
    return e.value.errors


def test_defaults_and_static_service() -> None:
    cfg = load_config_text("services:\n  api:\n    upstream: https://api.example.com/v2/\n    auth: {scheme: bearer, token: t0k}\n", env={})
    assert str(cfg.listen) == "127.0.0.1:8080"
    assert cfg.shutdown_timeout == 10
    assert cfg.log.format == "text"
    svc = cfg.services["api"]
    assert svc.prefix == "/api"
    assert svc.upstream.url == "https://api.example.com/v2"
    assert svc.upstream.port == 443
    assert svc.max_replay_body == 1048576
    assert svc.timeout.connect == 10 and svc.timeout.total == 300
    assert svc.auth.token == Secret("t0k")
    assert "t0k" not in repr(cfg)


def test_state_dir_from_systemd() -> None:
    cfg = load_config_text("services: {}", env={"STATE_DIRECTORY": "/var/lib/authproxy:/var/lib/other"})
    assert cfg.state_dir == "/var/lib/authproxy"


def test_required_key_names_path_and_line() -> None:
    errs = errors_of("listen: 127.0.0.1:8080\nservices:\n  svc:\n    upstream: http://x\n    auth:\n      scheme: header\n")
    assert errs == ["c.yaml:6: services.svc.auth.headers: required"]


def test_unknown_keys_are_errors_with_lines() -> None:
    errs = errors_of("listn: x\nservices:\n  svc:\n    upstream: http://x\n    prefx: /a\n    auth: {scheme: bearer, token: t, extra: 1}\n")
    assert "c.yaml:1: listn: unknown key" in errs
    assert "c.yaml:5: services.svc.prefx: unknown key" in errs
    assert "c.yaml:6: services.svc.auth.extra: unknown key" in errs


def test_bad_values() -> None:
    errs = errors_of(
        "listen: nowhere\nservices:\n  Bad_Name:\n    upstream: http://x\n    auth: {scheme: bearer, token: t}\n"
        "  ok:\n    upstream: ftp://x\n    timeout: {connect: fast}\n    auth: {scheme: nope}\n"
    )
    text = "\n".join(errs)
    assert "c.yaml:3: services.Bad_Name: service names" in text
    assert "c.yaml:8: services.ok.timeout.connect: expected a number" in text
    assert "c.yaml:9: services.ok.auth.scheme: unknown scheme 'nope'" in text
    errs = errors_of("services:\n  ok:\n    upstream: ftp://x\n    auth: {scheme: bearer, token: t}\n")
    assert errs[0].startswith("c.yaml:3: services.ok.upstream: expected scheme://host")
    errs = errors_of("listen: nowhere\n")
    assert errs[0].startswith("c.yaml:1: listen: expected host:port")


def test_duplicate_prefix_and_reserved_prefix() -> None:
    errs = errors_of(
        "services:\n  a:\n    upstream: http://x\n    prefix: /p\n    auth: {scheme: bearer, token: t}\n"
        "  b:\n    upstream: http://x\n    prefix: /p\n    auth: {scheme: bearer, token: t}\n"
        "  c:\n    upstream: http://x\n    prefix: /-/x\n    auth: {scheme: bearer, token: t}\n"
    )
    assert "c.yaml:8: services.b.prefix: /p is already the prefix of service a" in errs
    assert any("services.c.prefix: /-/ is reserved" in e for e in errs)


def test_interpolation(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("from-file\n")
    env = {"A": "a", "EMPTY": "", "DIR": str(tmp_path)}
    assert interpolate("x${A}y", env, tmp_path) == "xay"
    assert interpolate("${MISSING:-dflt}", env, tmp_path) == "dflt"
    assert interpolate("${EMPTY:-dflt}", env, tmp_path) == "dflt"
    assert interpolate("${EMPTY}", env, tmp_path) == ""
    assert interpolate("${file:secret.txt}", env, tmp_path) == "from-file"
    assert interpolate("${file:${DIR}/secret.txt}", env, tmp_path) == "from-file"
    assert interpolate("$${A} costs $5", env, tmp_path) == "${A} costs $5"


def test_missing_variable_is_named_never_valued() -> None:
    errs = errors_of("services:\n  s:\n    upstream: http://x\n    auth: {scheme: bearer, token: '${NOPE}'}\n", env={"OTHER": "v4lue"})
    assert errs == ["c.yaml:4: services.s.auth.token: environment variable NOPE is not set"]


def test_secret_files(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("file-token\n")
    (tmp_path / "keys").write_text("# inbound keys\nk1\n\n  k2  \n")
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        "inbound:\n  keys_file: keys\nservices:\n  s:\n    upstream: http://x\n    auth: {scheme: bearer, token_file: tok}\n"
    )
    cfg = load_config(cfg_path, env={})
    assert cfg.services["s"].auth.token.reveal() == "file-token"
    assert [(k.name, k.key.reveal()) for k in cfg.inbound.keys] == [("key1", "k1"), ("key2", "k2")]


def test_secret_file_errors(tmp_path: Path) -> None:
    errs = errors_of(
        "services:\n  s:\n    upstream: http://x\n    auth: {scheme: bearer, token: a, token_file: /nonexistent}\n"
        "  t:\n    upstream: http://x\n    auth: {scheme: bearer, token_file: /nonexistent/tok}\n"
    )
    assert "c.yaml:4: services.s.auth.token_file: give either token or token_file, not both" in errs
    assert any(e.startswith("c.yaml:7: services.t.auth.token_file: cannot read file /nonexistent/tok") for e in errs)


def test_remote_listen_needs_allow_remote_and_keys() -> None:
    errs = errors_of("listen: 0.0.0.0:8080\n")
    assert "not a loopback address" in errs[0] and errs[0].startswith("c.yaml:1: listen:")
    errs = errors_of("listen: 0.0.0.0:8080\ninbound: {allow_remote: true}\n")
    assert "not a loopback address" in errs[0]
    cfg = load_config_text("listen: 0.0.0.0:8080\ninbound: {allow_remote: true, keys: [k]}\n", env={})
    assert cfg.listen.host == "0.0.0.0"


def test_listen_forms() -> None:
    assert parse_listen("[::1]:9000").host == "::1"
    assert parse_listen("unix:/run/a.sock").path == "/run/a.sock"
    assert parse_listen("localhost:1").is_loopback
    assert parse_upstream("http://[::1]:8/x").origin == "http://[::1]:8"
    assert parse_upstream("https://H.example:443").origin == "https://h.example"


def test_invalid_yaml() -> None:
    errs = errors_of("services:\n  a: [\n")
    assert errs[0].startswith("c.yaml:") and "not valid YAML" in errs[0]


def test_check_cli_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("services:\n  s:\n    upstream: http://127.0.0.1:1\n    auth: {scheme: bearer, token: '${TOK}'}\n")
    r = run_cli("check", "-c", str(good), cwd=tmp_path, env={"TOK": "cli-secret-value"})
    assert r.returncode == 0, r.stderr
    assert "cli-secret-value" not in r.stdout + r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n  bugfender:\n    upstream: http://127.0.0.1:1\n    auth:\n      scheme: bearer\n")
    r = run_cli("check", "-c", str(bad), cwd=tmp_path)
    assert r.returncode == 2
    assert f"{bad}:5: services.bugfender.auth.token: required" in r.stderr
    r = run_cli("check", "-c", str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert r.returncode == 2 and "cannot read the configuration file" in r.stderr
    r = run_cli("token", "nosuch", "-c", str(good), cwd=tmp_path, env={"TOK": "x"})
    assert r.returncode == 2 and "services.nosuch: no such service" in r.stderr
    r = run_cli("frobnicate", cwd=tmp_path)
    assert r.returncode == 2
    # the default file and $AUTHPROXY_CONFIG
    r = run_cli("check", cwd=tmp_path, env={"AUTHPROXY_CONFIG": str(good), "TOK": "x"})
    assert r.returncode == 0
    (tmp_path / "authproxy.yaml").write_text(good.read_text())
    r = run_cli("check", cwd=tmp_path, env={"TOK": "x", "AUTHPROXY_CONFIG": ""})
    assert r.returncode == 0, r.stderr


def test_example_config_is_valid() -> None:
    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "config.example.yaml", env={})
    assert "echo" in cfg.services
