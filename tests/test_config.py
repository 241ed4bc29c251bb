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


# --------------------------------------------------------------------------- k_command, named inbound keys, allow rules


def test_secret_commands(tmp_path: Path) -> None:
    import sys

    (tmp_path / "keys").write_text("# more keys\nfile-key-a\n\nfile-key-b\n")
    text = (
        "inbound:\n"
        "  keys:\n"
        "    - plain-key-a\n"
        "    - name: agent.one_2\n"
        f"      key_command: [{sys.executable}, -c, 'print(\"agent-key\")']\n"
        "      services: [s]\n"
        "    - plain-key-b\n"
        "  keys_file: keys\n"
        "services:\n"
        "  s:\n"
        "    upstream: http://x\n"
        f"    auth: {{scheme: bearer, token_command: [{sys.executable}, -c, 'print(\"from-a-command\")']}}\n"
        "  t:\n"
        "    upstream: http://y\n"
        "    auth: {scheme: bearer, token_command: [printf, 'two\\n\\n']}\n"
    )
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(text)
    cfg = load_config(cfg_path, env={})
    assert cfg.services["s"].auth.token.reveal() == "from-a-command"
    assert cfg.services["t"].auth.token.reveal() == "two"  # trailing newlines stripped
    keys = [(k.name, k.key.reveal(), k.services) for k in cfg.inbound.keys]
    assert keys == [
        ("key1", "plain-key-a", None),
        ("agent.one_2", "agent-key", ("s",)),
        ("key2", "plain-key-b", None),
        ("key3", "file-key-a", None),  # keys_file continues the numbering
        ("key4", "file-key-b", None),
    ]
    assert "agent-key" not in repr(cfg)
    # a plain keys_file alone, and keys_command
    cfg = load_config_text(f"inbound:\n  keys_command: [{sys.executable}, -c, 'print(\"c1\\n# no\\nc2\")']\n", env={})
    assert [(k.name, k.key.reveal()) for k in cfg.inbound.keys] == [("key1", "c1"), ("key2", "c2")]


def test_failing_secret_commands_are_named_never_their_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import authproxy.config as config_module

    py = sys.executable
    fail = "import sys; print('stdout-secret-1f'); print('first line', file=sys.stderr); print('it went wrong', file=sys.stderr); sys.exit(3)"
    errs = errors_of(
        "services:\n"
        "  a:\n    upstream: http://x\n"
        f"    auth:\n      scheme: bearer\n      token_command: [{py}, -c, \"{fail}\"]\n"
        "  b:\n    upstream: http://x\n"
        f"    auth: {{scheme: bearer, token_command: [{py}, -c, 'pass']}}\n"
        "  c:\n    upstream: http://x\n"
        "    auth: {scheme: bearer, token_command: [/nonexistent/secret-tool, lookup]}\n"
        "  d:\n    upstream: http://x\n"
        "    auth: {scheme: bearer, token_command: 'op read op://x'}\n"
        "  e:\n    upstream: http://x\n"
        "    auth: {scheme: bearer, token: t, token_command: [echo, x]}\n"
        "  f:\n    upstream: http://x\n"
        "    auth: {scheme: bearer, token_file: /x, token_command: [echo, x], token: t}\n"
    )
    assert f"c.yaml:6: services.a.auth.token_command: command {py} failed (exit status 3): it went wrong" in errs
    assert f"c.yaml:9: services.b.auth.token_command: command {py} printed nothing" in errs
    assert "c.yaml:12: services.c.auth.token_command: command /nonexistent/secret-tool not found" in errs
    assert "c.yaml:15: services.d.auth.token_command: expected a list [PROGRAM, ARG...] (run without a shell)" in errs
    assert "c.yaml:18: services.e.auth.token_command: give either token or token_command, not both" in errs
    assert "c.yaml:21: services.f.auth.token_file: give only one of token, token_file, token_command" in errs
    assert not any("stdout-secret-1f" in e for e in errs)
    # more than the time allowed: killed, and named
    monkeypatch.setattr(config_module, "COMMAND_TIMEOUT", 0.5)
    errs = errors_of(f"services:\n  a:\n    upstream: http://x\n    auth: {{scheme: bearer, token_command: [{py}, -c, 'import time; time.sleep(60)']}}\n")
    assert errs == [f"c.yaml:4: services.a.auth.token_command: command {py} did not finish within 0.5 s"]


def test_check_cli_names_a_failing_key_command(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("inbound:\n  keys:\n    - name: agent\n      key_command: [sh, -c, 'echo cmd-stdout-77; echo no vault session >&2; exit 4']\n")
    r = run_cli("check", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 2
    assert f"{cfg}:4: inbound.keys[0].key_command: command sh failed (exit status 4): no vault session" in r.stderr
    assert "cmd-stdout-77" not in r.stdout + r.stderr


def test_named_key_errors() -> None:
    svc = "services:\n  gh:\n    upstream: http://x\n    auth: {scheme: bearer, token: t}\n"
    errs = errors_of(
        "inbound:\n"
        "  keys:\n"
        "    - {name: agent, key: k1, services: [gh, nope]}\n"  # 3
        "    - {name: Agent, key: k2}\n"  # 4
        "    - {name: nokey}\n"  # 5
        "    - {name: empty, key: k3, services: []}\n"  # 6
        "    - {name: x, key: k4, bogus: 1}\n"  # 7
        "    - ''\n" + svc  # 8
    )
    assert "c.yaml:3: inbound.keys[0].services[1]: unknown service 'nope' (configured: gh)" in errs
    assert any(e.startswith("c.yaml:4: inbound.keys[1].name: key names are lower-case") for e in errs)
    assert "c.yaml:5: inbound.keys[2].key: required (or key_file, key_command)" in errs
    assert any(e.startswith("c.yaml:6: inbound.keys[3].services: must not be empty") for e in errs)
    assert "c.yaml:7: inbound.keys[4].bogus: unknown key" in errs
    assert any(e.startswith("c.yaml:8: inbound.keys[5]: expected a key") for e in errs)
    errs = errors_of("inbound:\n  keys:\n    - {name: key2, key: a}\n    - b\n    - c\n" + svc)
    assert errs == ["c.yaml:5: inbound.keys[2]: the key name key2 is already used by inbound.keys[0]"]
    errs = errors_of("inbound:\n  keys:\n    - {name: ops, key: same-key}\n    - same-key\n" + svc)
    assert errs == ["c.yaml:4: inbound.keys[1]: the same key as ops: each key must be different"]
    errs = errors_of("inbound:\n  keys: just-one\n")
    assert errs[0].startswith("c.yaml:2: inbound.keys: expected a list")
    # a remote listener counts named keys as keys
    cfg = load_config_text("listen: 0.0.0.0:1\ninbound:\n  allow_remote: true\n  keys: [{name: a, key: k}]\n", env={})
    assert cfg.inbound.keys[0].name == "a" and cfg.inbound.keys[0].services is None


def test_allow_rule_errors_name_the_key_path_and_line() -> None:
    head = "services:\n  gh:\n    upstream: http://x\n    auth: {scheme: bearer, token: t}\n    allow:\n"
    errs = errors_of(
        head + "      - methods: [GET, get]\n"  # 6
        "        paths: [/a]\n"
        "      - methods: [GET]\n"
        "        paths:\n"
        "          - /repos/*\n"
        "          - repos/x\n"  # 11
        "      - {methods: [], paths: [/a]}\n"  # 12
        "      - {methods: [FETCH], paths: [/a]}\n"  # 13
        "      - {paths: []}\n"  # 14
        "      - {methods: [GET]}\n"  # 15
        "      - {paths: ['/a?x=1']}\n"  # 16
    )
    assert "c.yaml:6: services.gh.allow[0].methods[1]: unknown method 'get' (methods are upper-case: GET)" in errs
    assert "c.yaml:11: services.gh.allow[1].paths[1]: must start with '/' (the path after the service prefix)" in errs
    assert any(e.startswith("c.yaml:12: services.gh.allow[2].methods: must not be empty") for e in errs)
    assert "c.yaml:13: services.gh.allow[3].methods[0]: unknown method 'FETCH'" in errs
    assert "c.yaml:14: services.gh.allow[4].paths: must not be empty" in errs
    assert "c.yaml:15: services.gh.allow[5].paths: required" in errs
    assert "c.yaml:16: services.gh.allow[6].paths[0]: the query is not part of the path a rule matches" in errs
    errs = errors_of(head.replace("    allow:\n", "    allow: []\n"))
    assert errs[0].startswith("c.yaml:5: services.gh.allow: an empty list would refuse every request")
    # each path problem alone
    for bad, why in [
        ("/a/**b", "'**' must be a whole segment"),
        ("/x//*", "never matches a path with '//'"),
        ("/a/../b", "'.' or '..' segment"),
        ("/%2F/*", "never matches a path with '//' or an encoded"),
        ("/a b", "spaces"),
    ]:
        errs = errors_of(head + f"      - paths: ['{bad}']\n")
        assert len(errs) == 1 and errs[0].startswith("c.yaml:6: services.gh.allow[0].paths[0]: ") and why in errs[0], (bad, errs)
    cfg = load_config_text(head + "      - {methods: ['*'], paths: ['/**']}\n", env={})
    assert cfg.services["gh"].allow is not None and cfg.services["gh"].allow.allows("DELETE", "/x/y")
    assert load_config_text(head.replace("    allow:\n", ""), env={}).services["gh"].allow is None


def test_example_config_least_privilege_examples() -> None:
    """The active allow example parses as documented; the commented named-key
    example is valid once uncommented."""
    root = Path(__file__).resolve().parent.parent
    text = (root / "config.example.yaml").read_text()
    cfg = load_config(root / "config.example.yaml", env={})
    allow = cfg.services["echo-header"].allow
    assert allow is not None and allow.allows("GET", "/a/b") and allow.allows("POST", "/items/3/comments")
    assert not allow.allows("DELETE", "/items/3") and not allow.allows("POST", "/items/3")
    assert cfg.services["echo"].allow is None
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("  # keys:"))
    end = next(i for i, ln in enumerate(lines) if ln.startswith("  # keys_file:"))
    block = [ln.replace("  # ", "  ", 1) for ln in lines[start:end]]
    block = [ln.replace("key_file: /run/secrets/triage-agent-key", "key: agent-key-x") for ln in block]
    active = "\n".join(lines[:start] + block + lines[end:]).replace("  keys: []", "  # keys: []", 1)
    cfg = load_config_text(active, env={"OPS_KEY": "ops-key-x"}, path=str(root / "config.example.yaml"))
    assert [(k.name, k.services) for k in cfg.inbound.keys] == [("triage-agent", ("echo-header",)), ("key1", None)]


def test_store_needs_a_real_key_file(tmp_path):
    """An empty or short store.key_file is a configuration error (exit 2), never a
    traceback at start: a replica with a blank key would seal what no other opens."""
    from authproxy.config import load_config_text
    from authproxy.settings import ConfigError

    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    short = tmp_path / "short.key"
    short.write_text("abc")
    good = tmp_path / "good.key"
    good.write_text("0123456789abcdef0123456789abcdef\n")
    for key, message in ((empty, "is empty"), (short, "fewer than 16"), (None, "key_file: required")):
        doc = "store: {url: 'redis://127.0.0.1:6379/0'" + (f", key_file: '{key}'" if key else "") + "}\n"
        with pytest.raises(ConfigError, match=message):
            load_config_text(doc, env={})
    cfg = load_config_text(f"store: {{url: 'redis://127.0.0.1:6379/0', key_file: '{good}'}}\nworkers: auto\n", env={})
    assert cfg.store is not None and cfg.store.prefix == "authproxy:" and cfg.workers >= 1
    for bad in ("0", "-1", "two", "257"):
        with pytest.raises(ConfigError, match="workers"):
            load_config_text(f"workers: {bad}\n", env={})
    with pytest.raises(ConfigError, match="store.url"):
        load_config_text(f"store: {{url: 'http://x', key_file: '{good}'}}\n", env={})
    with pytest.raises(ConfigError, match="password_file"):
        load_config_text(f"store: {{url: 'redis://:pw@x:6379/0', key_file: '{good}'}}\n", env={})
