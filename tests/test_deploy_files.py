"""The deployment files -- Dockerfile, Compose and Kubernetes examples, the
systemd example config -- stay true to the code: their configs load, the
commands they run work, and the paths they share agree with each other.

Secrets are generated here at test time and live in temporary directories;
every listener is on loopback.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = EXAMPLES / "docker-compose.yaml"
COMPOSE_CONFIG = EXAMPLES / "authproxy-compose.yaml"
K8S = EXAMPLES / "kubernetes-sidecar.yaml"
SYSTEMD_CONFIG = REPO / "systemd" / "config.yaml"
REPLICAS_COMPOSE = EXAMPLES / "compose-replicas.yaml"
REPLICAS_CONFIG = EXAMPLES / "authproxy-replicas.yaml"
K8S_REDIS = EXAMPLES / "kubernetes-redis-sidecars.yaml"
SCALE_OUT = REPO / "docs" / "scale-out.md"

ALL_YAML = sorted(EXAMPLES.glob("*.yaml")) + sorted(EXAMPLES.glob("*.yml")) + [SYSTEMD_CONFIG]

SUBPROCESS_TIMEOUT = 60.0


# --------------------------------------------------------------------------
# parsing helpers


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continuation are dropped by Docker too
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "Dockerfile ends inside a continuation"
    out = []
    for line in logical:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def docker_env() -> dict[str, str]:
    """ENV of the final stage (both `ENV K=V K2=V2` and `ENV K V` forms)."""
    env: dict[str, str] = {}
    for word, args in final_stage():
        if word != "ENV":
            continue
        if "=" not in args.split()[0]:
            key, _, value = args.partition(" ")
            env[key] = value.strip()
            continue
        for item in args.split():
            key, _, value = item.partition("=")
            env[key] = value
    return env


def healthcheck_command() -> list[str]:
    checks = [args for word, args in final_stage() if word == "HEALTHCHECK"]
    assert len(checks) == 1, "exactly one HEALTHCHECK in the final stage"
    match = re.search(r"\bCMD\s+(\[.*\])\s*$", checks[0])
    assert match, "HEALTHCHECK should use the exec form: CMD [...]"
    return json.loads(match.group(1))


def k8s_documents() -> list[dict]:
    return [d for d in yaml.safe_load_all(K8S.read_text()) if d]


def k8s_config_text() -> str:
    (cm,) = [d for d in k8s_documents() if d["kind"] == "ConfigMap"]
    return cm["data"]["config.yaml"]


def k8s_sidecar() -> dict:
    (deploy,) = [d for d in k8s_documents() if d["kind"] == "Deployment"]
    spec = deploy["spec"]["template"]["spec"]
    containers = spec.get("initContainers", []) + spec["containers"]
    (sidecar,) = [c for c in containers if c["name"] == "authproxy"]
    return sidecar


def secret_paths(config_text: str) -> list[str]:
    """Every path a `*_file:` key names."""
    return re.findall(r"^\s*\w+_file:\s*(\S+)", config_text, flags=re.M)


def with_local_paths(config_text: str, tmp: Path, prefix: str) -> tuple[str, dict[str, str]]:
    """Rewrite the secret directory ``prefix`` and state_dir to ``tmp``, and
    create every secret file the config names with a fresh random value.
    Returns the rewritten text and {file name: secret}."""
    secret_dir = tmp / "secrets"
    secret_dir.mkdir(exist_ok=True)
    text = config_text.replace(prefix, str(secret_dir) + "/")
    text = re.sub(r"(?m)^(\s*state_dir:).*$", rf"\g<1> {tmp / 'state'}", text)
    generated = {}
    for path in secret_paths(text):
        assert path.startswith(str(secret_dir)), f"{path} is not under {prefix}"
        value = secrets.token_urlsafe(24)
        Path(path).write_text(value + "\n")
        generated[Path(path).name] = value
    return text, generated


def systemd_credentials() -> set[str]:
    """Names of the credentials systemd/config.yaml reads (uncommented keys)."""
    return set(re.findall(r"(?m)^\s*\w+_file:\s*\$\{CREDENTIALS_DIRECTORY\}/([\w.-]+)",
                          SYSTEMD_CONFIG.read_text()))


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("AUTHPROXY_CONFIG", "STATE_DIRECTORY", "CREDENTIALS_DIRECTORY",
                        "NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


async def run(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> tuple[int, str]:
    """Run argv to completion (bounded), returning (exit code, stdout+stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), SUBPROCESS_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, out.decode(errors="replace")


# --------------------------------------------------------------------------
# the files parse


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.name)
def test_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


def test_k8s_config_is_yaml():
    assert isinstance(yaml.safe_load(k8s_config_text()), dict)


# --------------------------------------------------------------------------
# their configs load


def test_compose_config_loads(tmp_path, monkeypatch):
    from authproxy.config import load_config

    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    text, _ = with_local_paths(COMPOSE_CONFIG.read_text(), tmp_path, "/run/secrets/")
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(text)
    config = load_config(cfg_path)
    assert set(config.services) == {"github", "bugfender"}
    assert config.inbound.allow_remote is True
    assert config.inbound.keys, "keys_file must resolve to the inbound keys"
    assert "authproxy" in config.inbound.hosts
    assert str(config.state_dir) == str(tmp_path / "state")


def test_compose_config_without_keys_is_refused(tmp_path):
    """The rule the example relies on: 0.0.0.0 needs allow_remote AND keys."""
    from authproxy.config import ConfigError, load_config

    text, _ = with_local_paths(COMPOSE_CONFIG.read_text(), tmp_path, "/run/secrets/")
    text = re.sub(r"(?m)^\s*keys_file:.*\n", "", text)
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(cfg_path)
    assert "listen" in str(info.value)


def test_k8s_config_loads(tmp_path):
    from authproxy.config import load_config

    text, _ = with_local_paths(k8s_config_text(), tmp_path, "/run/secrets/authproxy/")
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(text)
    config = load_config(cfg_path)
    assert set(config.services) == {"github", "bugfender"}
    assert str(config.state_dir) == str(tmp_path / "state")


def test_systemd_config_loads(tmp_path, monkeypatch):
    from authproxy.config import load_config

    creds = tmp_path / "credentials"
    creds.mkdir()
    text = SYSTEMD_CONFIG.read_text()
    for name in systemd_credentials():
        (creds / name).write_text(secrets.token_urlsafe(24) + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    config = load_config(SYSTEMD_CONFIG)
    assert set(config.services) == {"github", "bugfender"}
    # No state_dir in the file: systemd's StateDirectory= decides.
    assert str(config.state_dir) == str(tmp_path / "state")


# --------------------------------------------------------------------------
# `authproxy check` on each example, the way the image runs it


async def test_image_env_and_check_on_compose_config(tmp_path):
    """ENTRYPOINT authproxy + ENV AUTHPROXY_CONFIG/STATE_DIRECTORY: with the
    config where the image says (here: rewritten to temporary paths) and no
    -c, `authproxy check` finds it, validates it and prints no secret."""
    env = docker_env()
    text, generated = with_local_paths(COMPOSE_CONFIG.read_text(), tmp_path, "/run/secrets/")
    cfg_path = tmp_path / Path(env["AUTHPROXY_CONFIG"]).name
    cfg_path.write_text(text)
    code, out = await run(
        [sys.executable, "-m", "authproxy", "check"],
        child_env(AUTHPROXY_CONFIG=str(cfg_path), STATE_DIRECTORY=str(tmp_path / "state")),
        cwd=tmp_path)
    assert code == 0, out
    for value in generated.values():
        assert value not in out


async def test_check_on_k8s_config(tmp_path):
    text, generated = with_local_paths(k8s_config_text(), tmp_path, "/run/secrets/authproxy/")
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(text)
    args = k8s_sidecar()["args"]
    assert args[0] == "run"
    argv = ["check" if a == "run" else (str(cfg_path) if a.endswith("config.yaml") else a)
            for a in args]
    code, out = await run([sys.executable, "-m", "authproxy", *argv], child_env(), cwd=tmp_path)
    assert code == 0, out
    for value in generated.values():
        assert value not in out


async def test_check_on_systemd_config(tmp_path):
    creds = tmp_path / "credentials"
    creds.mkdir()
    generated = []
    for name in systemd_credentials():
        value = secrets.token_urlsafe(24)
        (creds / name).write_text(value + "\n")
        generated.append(value)
    assert generated
    code, out = await run(
        [sys.executable, "-m", "authproxy", "check", "-c", str(SYSTEMD_CONFIG)],
        child_env(CREDENTIALS_DIRECTORY=str(creds), STATE_DIRECTORY=str(tmp_path / "state")),
        cwd=tmp_path)
    assert code == 0, out
    for value in generated:
        assert value not in out


async def test_check_names_a_missing_secret_without_its_value(tmp_path):
    """What an operator sees when a Compose secret is not mounted."""
    text, generated = with_local_paths(COMPOSE_CONFIG.read_text(), tmp_path, "/run/secrets/")
    (tmp_path / "secrets" / "github-token").unlink()
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(text)
    code, out = await run([sys.executable, "-m", "authproxy", "check", "-c", str(cfg_path)],
                          child_env(), cwd=tmp_path)
    assert code == 2, out
    assert "github-token" in out
    for value in generated.values():
        assert value not in out


# --------------------------------------------------------------------------
# health checks and probes run for real


async def _probe_target(status: int = 200):
    """A stand-in for the proxy's reserved endpoints on a loopback port."""
    async def handler(request: web.Request) -> web.Response:
        if status == 200:
            return web.json_response({"status": "ok"})
        return web.json_response({"services": {}}, status=status)

    app = web.Application()
    app.router.add_get("/-/healthz", handler)
    app.router.add_get("/-/readyz", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, port


def _localize(command: list[str], port: int) -> list[str]:
    """The probe command as the image would run it, against ``port``: the
    image's `python` is this interpreter."""
    assert command[0] == "python", "slim images have python, not curl"
    joined = json.dumps(command)
    assert joined.count("127.0.0.1:8080") == 1, command
    return [sys.executable] + json.loads(joined.replace("127.0.0.1:8080", f"127.0.0.1:{port}"))[1:]


# A proxy variable in the container's environment must not capture the check.
PROXY_ENV = {"http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
async def test_dockerfile_healthcheck_runs(status, healthy):
    command = healthcheck_command()
    assert "/-/healthz" in " ".join(command)
    runner, port = await _probe_target(status)
    try:
        code, out = await run(_localize(command, port), child_env(**PROXY_ENV))
    finally:
        await runner.cleanup()
    assert (code == 0) is healthy, out


async def test_dockerfile_healthcheck_fails_when_nothing_listens():
    runner, port = await _probe_target()
    await runner.cleanup()  # the port is now closed
    code, _ = await run(_localize(healthcheck_command(), port), child_env())
    assert code != 0


@pytest.mark.parametrize("probe, path", [("startupProbe", "/-/healthz"),
                                         ("livenessProbe", "/-/healthz"),
                                         ("readinessProbe", "/-/readyz")])
@pytest.mark.parametrize("status, ok", [(200, True), (503, False)])
async def test_k8s_probes_run(probe, path, status, ok):
    command = k8s_sidecar()[probe]["exec"]["command"]
    assert path in " ".join(command)
    runner, port = await _probe_target(status)
    try:
        code, out = await run(_localize(command, port), child_env(**PROXY_ENV))
    finally:
        await runner.cleanup()
    assert (code == 0) is ok, out


# --------------------------------------------------------------------------
# the Dockerfile's contract


def test_dockerfile_contract():
    instructions = dockerfile_instructions()
    froms = [args for word, args in instructions if word == "FROM"]
    assert len(froms) >= 2, "multi-stage: build a wheel, install it in a clean stage"
    assert all(f.split()[0] == "python:3.12-slim" for f in froms)

    final = final_stage()
    users = [args for word, args in final if word == "USER"]
    assert users, "the final stage must drop root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root USER (runAsNonRoot can check it)"
    last_user = max(i for i, (word, _) in enumerate(final) if word == "USER")
    assert all(word != "RUN" for word, _ in final[last_user:]), "no RUN after USER"

    assert [args for word, args in final if word == "STOPSIGNAL"] == ["SIGTERM"]
    assert [json.loads(args) for word, args in final if word == "ENTRYPOINT"] == [["authproxy"]]
    assert [json.loads(args) for word, args in final if word == "CMD"] == [["run"]]
    assert "8080" in [args for word, args in final if word == "EXPOSE"]
    env = docker_env()
    assert env["AUTHPROXY_CONFIG"] == "/etc/authproxy/config.yaml"
    assert env["STATE_DIRECTORY"] == "/var/lib/authproxy"


def test_entrypoint_is_the_installed_script():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["authproxy"] == "authproxy.cli:main"


def test_dockerignore_keeps_what_the_build_copies():
    """.dockerignore is an allow-list: every COPY source must be re-included."""
    lines = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines()
             if l.strip() and not l.strip().startswith("#")]
    assert lines[0] == "*"
    allowed = {l[1:].rstrip("/") for l in lines if l.startswith("!")}
    for word, args in dockerfile_instructions():
        if word != "COPY" or "--from=" in args:
            continue
        *sources, _dest = args.split()
        for src in sources:
            assert src.rstrip("/") in allowed, f"COPY {src} is excluded by .dockerignore"
            assert (REPO / src).exists(), src


# --------------------------------------------------------------------------
# the pieces agree with each other


def test_compose_wiring():
    compose = yaml.safe_load(COMPOSE.read_text())
    config = yaml.safe_load(COMPOSE_CONFIG.read_text())
    proxy = compose["services"]["authproxy"]
    env = docker_env()

    # The config is mounted where the image looks for it.
    mounts = {m.split(":")[1]: m.split(":")[0] for m in proxy["volumes"]}
    assert mounts[env["AUTHPROXY_CONFIG"]] == "./" + COMPOSE_CONFIG.name
    assert env["STATE_DIRECTORY"] in mounts, "state on a volume"
    assert proxy.get("environment", {}).get("AUTHPROXY_CONFIG", env["AUTHPROXY_CONFIG"]) \
        == env["AUTHPROXY_CONFIG"]

    # Every secret file the config reads is a secret mounted into the proxy.
    mounted = set(proxy["secrets"])
    for path in secret_paths(COMPOSE_CONFIG.read_text()):
        assert path.startswith("/run/secrets/"), path
        name = path.removeprefix("/run/secrets/")
        assert name in mounted and name in compose["secrets"], name
        assert "file" in compose["secrets"][name]

    # Reachable from the app: a non-loopback listener, with allow_remote and keys.
    host, _, port = config["listen"].rpartition(":")
    assert host == "0.0.0.0"
    assert config["inbound"]["allow_remote"] is True
    assert config["inbound"].get("keys") or config["inbound"].get("keys_file")
    assert port in [str(p) for p in proxy.get("expose", [])]
    assert "ports" not in proxy, "do not publish the proxy on the host"

    # The app calls it by its service name, which must be an accepted Host.
    app = compose["services"]["app"]
    urls = [v for v in app["environment"].values() if str(v).startswith("http://")]
    assert urls
    for url in urls:
        assert url.startswith(f"http://authproxy:{port}/")
        service = url.split("/")[3]
        assert service in config["services"], url
    assert "authproxy" in config["inbound"]["hosts"]
    assert app["depends_on"]["authproxy"]["condition"] == "service_healthy"
    assert proxy["stop_signal"] == "SIGTERM"


def test_k8s_wiring():
    (deploy,) = [d for d in k8s_documents() if d["kind"] == "Deployment"]
    pod = deploy["spec"]["template"]["spec"]
    sidecar = k8s_sidecar()
    config_text = k8s_config_text()
    config = yaml.safe_load(config_text)

    # Loopback inside the pod: no allow_remote, no keys needed.
    assert config["listen"] == "127.0.0.1:8080"
    assert not config.get("inbound", {}).get("allow_remote")

    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}

    # The ConfigMap is mounted where -c points.
    (cm_volume,) = [n for n, v in volumes.items() if "configMap" in v]
    config_arg = sidecar["args"][sidecar["args"].index("-c") + 1]
    assert config_arg == mounts[cm_volume] + "/config.yaml"

    # Secret files come from the Secret volume under /run/secrets.
    (secret_volume,) = [n for n, v in volumes.items() if "secret" in v]
    secret_dir = mounts[secret_volume]
    assert secret_dir.startswith("/run/secrets/")
    for path in secret_paths(config_text):
        assert os.path.dirname(path) == secret_dir, path

    # State on a writable volume.
    state_mount = next(m for m in mounts.values() if config["state_dir"].startswith(m))
    assert state_mount

    # Same uid as the image, non-root, read-only root fs.
    user = next(args for word, args in final_stage() if word == "USER").split(":")[0]
    ctx = sidecar["securityContext"]
    assert str(ctx["runAsUser"]) == user
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert ctx["readOnlyRootFilesystem"] is True

    # The app talks to the sidecar on loopback, to configured services.
    (app,) = [c for c in pod["containers"] if c["name"] != "authproxy"]
    urls = [e["value"] for e in app.get("env", []) if str(e.get("value", "")).startswith("http://")]
    assert urls
    for url in urls:
        assert url.startswith("http://127.0.0.1:8080/")
        assert url.split("/")[3] in config["services"]

    # Enough time to drain and revoke before SIGKILL.
    assert pod["terminationGracePeriodSeconds"] > config.get("shutdown_timeout", 10) + 5


# --------------------------------------------------------------------------
# systemd/authproxy.logrotate: the audit file's rotation

LOGROTATE = REPO / "systemd" / "authproxy.logrotate"
LOGROTATE_DIRECTIVES = {
    "daily", "weekly", "monthly", "rotate", "compress", "delaycompress", "missingok", "notifempty",
    "create", "sharedscripts", "postrotate", "endscript", "su", "maxage", "dateext",
}  # fmt: skip


def logrotate_stanzas() -> dict[str, list[str]]:
    """path → its directive lines (comments dropped, postrotate scripts kept as lines)."""
    stanzas: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in LOGROTATE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if current is None:
            assert line.endswith("{"), f"expected 'PATH {{', got {line!r}"
            current = stanzas.setdefault(line[:-1].strip(), [])
        elif line == "}":
            current = None
        else:
            current.append(line)
    assert current is None, "unclosed stanza"
    return stanzas


def test_logrotate_rotates_the_audit_file_and_sends_hup():
    stanzas = logrotate_stanzas()
    assert len(stanzas) == 1
    ((path, lines),) = stanzas.items()
    assert path.startswith("/var/log/authproxy/")
    script = lines[lines.index("postrotate") + 1 : lines.index("endscript")]
    directives = [line.split() for line in lines if line not in script]
    for words in directives:
        assert words[0] in LOGROTATE_DIRECTIVES, words
    assert ["create", "0600"] in directives  # the audit file stays private across rotations
    assert ["rotate", "14"] in directives and ["daily"] in directives
    assert {"compress", "delaycompress", "missingok", "notifempty"} <= {w[0] for w in directives}
    # postrotate makes the service reopen its audit file (authproxy reopens on SIGHUP).
    (cmd,) = script
    assert re.search(r"\bsystemctl kill -s HUP authproxy\.service\b", cmd), cmd
    assert (REPO / "systemd" / "authproxy.service").exists()


def test_logrotate_names_the_path_its_example_config_sets():
    from authproxy.config import load_config_text

    (path,) = logrotate_stanzas()
    (example,) = [m.group(1) for m in re.finditer(r"(?m)^#\s+(log:\s*\{.*audit_file.*\})\s*$", LOGROTATE.read_text())]
    config = load_config_text(example + "\n")
    assert config.log.audit_file == path


# --------------------------------------------------------------------------
# scale out: two Compose replicas and a Kubernetes fleet sharing one Redis


def k8s_redis_documents() -> list[dict]:
    return [d for d in yaml.safe_load_all(K8S_REDIS.read_text()) if d]


def k8s_redis_config_text() -> str:
    (cm,) = [d for d in k8s_redis_documents() if d["kind"] == "ConfigMap"]
    return cm["data"]["config.yaml"]


def k8s_redis_kind(kind: str, name: str) -> dict:
    (doc,) = [d for d in k8s_redis_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def acl_rules(text: str) -> list[str]:
    """The rules of the Redis ACL user the example's set-up comment writes
    (``printf 'user default off\\nuser authproxy on #%s RULES\\n'``)."""
    (rules,) = re.findall(r"user default off\\nuser authproxy on #%s (.+?)\\n'", text)
    return rules.split()


def kubectl_secrets(text: str) -> dict[str, set[str]]:
    """{Secret name: its keys} from the `kubectl create secret generic` lines of a header."""
    out: dict[str, set[str]] = {}
    joined = re.sub(r"\\\n#\s*", " ", text)  # continuation lines of the comment
    for m in re.finditer(r"kubectl create secret generic (\S+)((?:\s+--from-file=[\w.-]+=\S+)+)", joined):
        out[m.group(1)] = set(re.findall(r"--from-file=([\w.-]+)=", m.group(2)))
    return out


def with_store_key(text: str, tmp: Path, prefix: str) -> tuple[str, dict[str, str]]:
    """with_local_paths, and the store key made the way the docs say
    (`head -c 32 /dev/urandom | base64`), mode 0600."""
    text, generated = with_local_paths(text, tmp, prefix)
    key_path = Path(yaml.safe_load(text)["store"]["key_file"])
    key = base64.b64encode(os.urandom(32)).decode()
    key_path.write_text(key + "\n")
    key_path.chmod(0o600)
    generated[key_path.name] = key
    return text, generated


def test_replicas_compose_config_loads(tmp_path):
    from authproxy.config import load_config_text
    from authproxy.store.redis import RedisStore

    text, generated = with_store_key(REPLICAS_CONFIG.read_text(), tmp_path, "/run/secrets/")
    config = load_config_text(text)
    assert set(config.services) == {"fogbugz", "bugfender"}
    assert config.inbound.allow_remote is True and config.inbound.keys
    assert "authproxy" in config.inbound.hosts
    store = config.store
    assert store is not None and store.url == "redis://redis:6379/0"
    assert store.username == "authproxy" and store.prefix == "authproxy:"
    assert store.password is not None and store.password.reveal() == generated["redis-password"]
    # The key file is usable as is (read here; no connection is made).
    assert RedisStore(store).cipher.fingerprint("x")


def test_k8s_redis_config_loads(tmp_path):
    from authproxy.config import load_config_text
    from authproxy.store.redis import RedisStore

    text, generated = with_store_key(k8s_redis_config_text(), tmp_path, "/run/secrets/authproxy/")
    config = load_config_text(text)
    assert set(config.services) == {"fogbugz", "bugfender"}
    assert str(config.state_dir) == str(tmp_path / "state")
    assert config.store is not None and config.store.url == "redis://authproxy-redis:6379/0"
    assert config.store.password is not None and config.store.password.reveal() == generated["redis-password"]
    assert RedisStore(config.store).cipher.fingerprint("x")


@pytest.mark.parametrize("which", ["compose", "k8s"])
async def test_check_on_replicas_configs(tmp_path, which):
    if which == "compose":
        text, generated = with_store_key(REPLICAS_CONFIG.read_text(), tmp_path, "/run/secrets/")
    else:
        text, generated = with_store_key(k8s_redis_config_text(), tmp_path, "/run/secrets/authproxy/")
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(text)
    code, out = await run([sys.executable, "-m", "authproxy", "check", "-c", str(cfg_path)],
                          child_env(STATE_DIRECTORY=str(tmp_path / "state")), cwd=tmp_path)
    assert code == 0, out
    for value in generated.values():
        assert value not in out


def test_replicas_compose_wiring():
    compose = yaml.safe_load(REPLICAS_COMPOSE.read_text())
    config_text = REPLICAS_CONFIG.read_text()
    config = yaml.safe_load(config_text)
    services = compose["services"]
    proxy, redis = services["authproxy"], services["redis"]
    env = docker_env()

    # Two replicas of one service, each with the same config where the image looks.
    assert proxy["deploy"]["replicas"] == 2
    mounts = {m.split(":")[1]: m.split(":")[0] for m in proxy["volumes"]}
    assert mounts[env["AUTHPROXY_CONFIG"]] == "./" + REPLICAS_CONFIG.name
    assert proxy["environment"]["AUTHPROXY_CONFIG"] == env["AUTHPROXY_CONFIG"]

    # Every secret file the config reads -- the store key included -- is a file
    # secret mounted into every replica.
    paths = secret_paths(config_text)
    assert config["store"]["key_file"] in paths and config["store"]["password_file"] in paths
    for path in paths:
        assert path.startswith("/run/secrets/"), path
        name = path.removeprefix("/run/secrets/")
        assert name in proxy["secrets"] and "file" in compose["secrets"][name], name

    # The store is the Redis service, on the port it exposes, started first.
    url = urlsplit(config["store"]["url"])
    assert url.scheme == "redis" and url.hostname in services and services[url.hostname] is redis
    assert str(url.port) in [str(p) for p in redis["expose"]]
    assert proxy["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "ports" not in proxy and "ports" not in redis, "publish neither on the host"

    # Redis reads its users from a secret; the user and key prefix are the config's;
    # AOF persistence is on (refresh tokens survive a restart).
    command = redis["command"]
    aclfile = command[command.index("--aclfile") + 1]
    assert aclfile.startswith("/run/secrets/") and aclfile.removeprefix("/run/secrets/") in redis["secrets"]
    assert command[command.index("--appendonly") + 1] == "yes"
    rules = acl_rules(REPLICAS_COMPOSE.read_text())
    prefix = config["store"]["prefix"]
    assert f"~{prefix}*" in rules and f"&{prefix}released:*" in rules
    assert config["store"]["username"] == "authproxy"
    assert "--user authproxy" in redis["healthcheck"]["test"][1]
    assert "/run/secrets/redis-password" in redis["healthcheck"]["test"][1]

    # The app calls the replicas by the service name, an accepted Host.
    app = services["app"]
    port = config["listen"].rpartition(":")[2]
    assert config["listen"].startswith("0.0.0.0:") and config["inbound"]["allow_remote"] is True
    assert port in [str(p) for p in proxy["expose"]]
    urls = [v for v in app["environment"].values() if str(v).startswith("http://")]
    assert urls
    for u in urls:
        assert u.startswith(f"http://authproxy:{port}/") and u.split("/")[3] in config["services"], u
    assert "authproxy" in config["inbound"]["hosts"]
    assert app["depends_on"]["authproxy"]["condition"] == "service_healthy"
    assert proxy["stop_signal"] == "SIGTERM"


def test_k8s_redis_wiring():
    header = K8S_REDIS.read_text()
    (app_deploy,) = [d for d in k8s_redis_documents() if d["kind"] == "Deployment" and d["metadata"]["name"] == "example-app"]
    redis_deploy = k8s_redis_kind("Deployment", "authproxy-redis")
    pod = app_deploy["spec"]["template"]["spec"]
    config_text = k8s_redis_config_text()
    config = yaml.safe_load(config_text)
    assert app_deploy["spec"]["replicas"] == 3

    # authproxy is a native sidecar of every pod, on loopback.
    (sidecar,) = [c for c in pod["initContainers"] if c["name"] == "authproxy"]
    assert sidecar["restartPolicy"] == "Always"
    assert config["listen"] == "127.0.0.1:8080"
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (cm_volume,) = [n for n, v in volumes.items() if "configMap" in v]
    assert sidecar["args"][sidecar["args"].index("-c") + 1] == mounts[cm_volume] + "/config.yaml"

    # Every secret file (the store key and Redis password included) is in the one
    # projected folder, from Secrets the header's kubectl lines create with those keys.
    (secret_volume,) = [n for n, v in volumes.items() if "projected" in v]
    secret_dir = mounts[secret_volume]
    sources = [s["secret"]["name"] for s in volumes[secret_volume]["projected"]["sources"]]
    created = kubectl_secrets(header)
    provided = set().union(*(created[s] for s in sources))
    paths = secret_paths(config_text)
    assert config["store"]["key_file"] in paths and config["store"]["password_file"] in paths
    for path in paths:
        assert os.path.dirname(path) == secret_dir, path
        assert os.path.basename(path) in provided, path
    assert created["authproxy-store"] >= {"store.key", "redis-password"}

    # Every sidecar points at the one Redis Service, which selects the Redis pod.
    url = urlsplit(config["store"]["url"])
    service = k8s_redis_kind("Service", url.hostname)
    (sport,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
    rpod = redis_deploy["spec"]["template"]
    assert service["spec"]["selector"].items() <= rpod["metadata"]["labels"].items()
    assert redis_deploy["spec"]["replicas"] == 1
    (redis,) = rpod["spec"]["containers"]
    assert sport["targetPort"] in [p["name"] for p in redis["ports"]]
    assert url.port in [p["containerPort"] for p in redis["ports"]]

    # Redis: the ACL file from its Secret, AOF on a persistent volume.
    args = redis["args"]
    aclfile = args[args.index("--aclfile") + 1]
    rmounts = {m["name"]: m["mountPath"] for m in redis["volumeMounts"]}
    rvolumes = {v["name"]: v for v in rpod["spec"]["volumes"]}
    (acl_volume,) = [n for n, v in rvolumes.items() if "secret" in v]
    assert os.path.dirname(aclfile) == rmounts[acl_volume]
    assert os.path.basename(aclfile) in created[rvolumes[acl_volume]["secret"]["secretName"]]
    assert args[args.index("--appendonly") + 1] == "yes"
    (data_volume,) = [v for v in rvolumes.values() if "persistentVolumeClaim" in v]
    assert k8s_redis_kind("PersistentVolumeClaim", data_volume["persistentVolumeClaim"]["claimName"])
    rules = acl_rules(header)
    prefix = config["store"]["prefix"]
    assert f"~{prefix}*" in rules and f"&{prefix}released:*" in rules
    assert config["store"]["username"] == "authproxy"

    # Only the app's pods may reach Redis.
    policy = k8s_redis_kind("NetworkPolicy", "authproxy-redis")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= rpod["metadata"]["labels"].items()
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"].items() <= app_deploy["spec"]["template"]["metadata"]["labels"].items()
    assert [p["port"] for p in rule["ports"]] == [url.port]

    # The same hardening as the single-pod example.
    user = next(args for word, args in final_stage() if word == "USER").split(":")[0]
    assert str(sidecar["securityContext"]["runAsUser"]) == user
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["terminationGracePeriodSeconds"] > config.get("shutdown_timeout", 10) + 5
    (app,) = pod["containers"]
    urls = [e["value"] for e in app.get("env", []) if str(e.get("value", "")).startswith("http://")]
    assert urls
    for u in urls:
        assert u.startswith("http://127.0.0.1:8080/") and u.split("/")[3] in config["services"]


def test_examples_and_docs_give_one_acl():
    """The Compose and Kubernetes examples create the same Redis user, and
    docs/scale-out.md shows it too; so do they the same store key command."""
    rules = acl_rules(REPLICAS_COMPOSE.read_text())
    assert acl_rules(K8S_REDIS.read_text()) == rules
    doc = SCALE_OUT.read_text()
    assert " ".join(rules) in doc
    assert "head -c 32 /dev/urandom | base64 > store.key" in doc


async def test_the_examples_acl_lets_a_store_work(redis_factory, monkeypatch):
    """Against a real redis-server: the user the examples create (a SHA-256
    password, the example's rules) can do everything the store does -- write
    with a ttl, read, compare-and-delete, a lock held past a renewal, a waiter
    woken by the release message -- and Redis logs no ACL denial."""
    import hashlib

    import authproxy.store.redis as redis_store
    from authproxy.config import StoreConfig
    from authproxy.secret import Secret

    server = redis_factory()
    password = secrets.token_urlsafe(32)
    digest = hashlib.sha256(password.encode()).hexdigest()
    reply = server.command("ACL", "SETUSER", "authproxy", "on", f"#{digest}", *acl_rules(REPLICAS_COMPOSE.read_text()))
    assert reply.startswith(b"+OK"), reply
    monkeypatch.setattr(redis_store, "LOCK_TTL", 0.6)  # renewed every 0.2 s

    key = server.dir / "store.key"
    key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    cfg = StoreConfig(url=server.url, key_file=str(key), username="authproxy", password=Secret(password), timeout=2.0)
    a, b = redis_store.RedisStore(cfg), redis_store.RedisStore(cfg)
    try:
        da, db = a.service("svc"), b.service("svc")
        await a.ping()
        await da.put("current", {"token": "t"}, ttl=30, tag="tag-1")
        assert await db.get("current") == {"token": "t"}
        assert await db.version("current") is not None
        assert await db.delete("current", if_tag="other") is False
        assert await db.delete("current", if_tag="tag-1") is True
        events: list[str] = []

        async def holder() -> None:
            async with da.lock("current"):
                events.append("a")
                await asyncio.sleep(1.0)  # past LOCK_TTL: only the renewals keep it
                events.append("a done")

        async def waiter() -> None:
            await asyncio.sleep(0.1)
            async with db.lock("current", wait=10):
                events.append("b")

        await asyncio.wait_for(asyncio.gather(holder(), waiter()), 20)
        assert events == ["a", "a done", "b"]
    finally:
        await a.close()
        await b.close()
    assert server.command("ACL", "LOG").startswith(b"*0"), "Redis denied the example's user something"


def test_config_example_store_block_loads_once_uncommented(tmp_path):
    from authproxy.config import load_config_text

    lines = (REPO / "config.example.yaml").read_text().splitlines()
    start = lines.index("# store:")
    block = ["store:"]
    for ln in lines[start + 1 :]:
        if not ln.startswith("#   "):
            break
        if ln.strip("# ").startswith("head -c") or not ln[4:].strip() or ln[4:].lstrip().startswith("#"):
            continue
        block.append("  " + ln[4:])
    text = "\n".join(block) + "\n"
    for path in [p for p in secret_paths(text) if p != "null"]:
        local = tmp_path / Path(path).name
        local.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
        text = text.replace(path, str(local))
    store = load_config_text(text, env={}).store
    assert store is not None and store.url.startswith("redis://") and store.prefix == "authproxy:"
    assert store.username == "authproxy" and store.password is not None and store.timeout == 2
