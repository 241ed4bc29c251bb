"""The ``authproxy`` command line: each sub-command is a few lines over the modules.

Exit codes: 0 success; 2 bad configuration or usage (unknown SERVICE included);
1 anything else (a port in use, an upstream failure).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any, Awaitable, Callable

from authproxy import __version__
from authproxy.config import Config, ConfigError, config_path, load_config
from authproxy.secret import Redactor, collect_secrets
from authproxy.observe import set_log_redactor, setup_logging

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="authproxy", description="A local authenticating reverse proxy.")
    p.add_argument("--version", action="version", version=f"authproxy {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def cfg(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("-c", "--config", metavar="FILE", help="config file (default: $AUTHPROXY_CONFIG, then ./authproxy.yaml)")
        return sp

    cfg(sub.add_parser("run", help="run the proxy"))
    cfg(sub.add_parser("check", help="validate the config and that every secret resolves"))
    t = cfg(sub.add_parser("token", help="obtain (or reuse) a service's credential and print it"))
    t.add_argument("service", metavar="SERVICE")
    t.add_argument("--json", action="store_true", help='print {"headers": {...}, "query": {...}} with every injected part')
    t.add_argument("--obo", metavar="ID", help="app_token: that user's on-behalf-of token")
    lg = cfg(sub.add_parser("login", help="OAuth 2.0 login: authorization code, or the device flow (--device)"))
    lg.add_argument("service", metavar="SERVICE")
    lg.add_argument("--device", action="store_true", help="the device authorization grant (RFC 8628): for a machine without a browser")
    lo = cfg(sub.add_parser("logout", help="revoke every credential authproxy holds for SERVICE, then forget it"))
    lo.add_argument("service", metavar="SERVICE")
    r = cfg(sub.add_parser("rotate", help="app_token: create a new app token and store it"))
    r.add_argument("service", metavar="SERVICE")
    r.add_argument("--seconds", type=int, metavar="N", help="lifetime of the new app token")
    r.add_argument("--expire-old", action="store_true", help="expire the previous app token once the new one has worked")
    x = cfg(sub.add_parser("exec", help="run CMD with its HTTP clients routed through authproxy (forward-proxy mode)"))
    x.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]", help="the command to run and its arguments")
    cfg(sub.add_parser("ca", help="print the path of authproxy's CA certificate, creating the CA if needed"))
    d = sub.add_parser("demo", help="run built-in mock upstreams and a proxy in front of them")
    d.add_argument("--once", action="store_true", help="run the tour, print it, exit")
    d.add_argument("--listen", default=None, metavar="HOST:PORT", help="proxy address (default 127.0.0.1:8080; with --once a free port)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as e:
        print(f"authproxy: configuration error:\n{e}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as e:
        print(f"authproxy: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from authproxy.demo import run_demo

        return run_demo(once=args.once, listen=args.listen)
    if args.command == "exec":
        args.cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not args.cmd:
            raise UsageError("exec: no command given (authproxy exec [-c FILE] -- CMD [ARG...])")
    path = config_path(args.config)
    config = load_config(path)
    if args.command == "check":
        return _check(config)
    if args.command in ("exec", "ca"):
        return _exec_or_ca(config, args.command, args.cmd if args.command == "exec" else [])
    setup_logging(config.log.level, config.log.format)
    set_log_redactor(Redactor(collect_secrets(config)))  # every log line of token/login/logout/rotate too
    if args.command == "run":
        from authproxy.workers import is_worker, serve_worker, supervise

        if is_worker():  # started by the supervisor of workers: N
            return _run_async(serve_worker(config, path))
        if config.workers > 1:  # the parent serves nothing: the proxy is not even imported
            return _run_async(supervise(config, path))
        from authproxy.proxy.app import serve

        return _run_async(serve(config, path))
    from authproxy.schemes.base import CliIO, Interactive, Rotatable

    service = _service(config, args.service)
    steps: dict[str, Callable[[Any], Awaitable[int]]] = {
        "token": lambda rt: _token(rt, args.json, args.obo),
        "login": lambda rt: _done(_capable(rt, Interactive, "has no login step").login(CliIO(), device=args.device)),
        "logout": _logout,
        "rotate": lambda rt: _done(_capable(rt, Rotatable, "has nothing to rotate").rotate(CliIO(), args.seconds, args.expire_old)),
    }
    return _run_async(_with_runtime(config, service, steps[args.command]))


def _run_async(coro: Awaitable[int]) -> int:
    try:
        import uvloop  # the optional 'speed' extra
    except ImportError:
        uvloop = None  # type: ignore[assignment]
    # Not inside the except block: the loop would run with the ImportError as the
    # exception being handled, and sys.exc_info() in any coroutine would return it.
    if uvloop is None:
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]


def _exec_or_ca(config: Config, command: str, cmd: list[str]) -> int:
    from authproxy.exec import exec_log_level, load_ca, run_exec
    from authproxy.state import StateError

    if command == "exec":
        setup_logging(exec_log_level(config), config.log.format)  # CMD's output is not drowned
        set_log_redactor(Redactor(collect_secrets(config)))
        return _run_async(run_exec(config, cmd))
    try:
        print(load_ca(config).cert_path)
    except (OSError, ValueError, StateError) as e:
        print(f"authproxy: cannot use the CA: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def _service(config: Config, name: str) -> str:
    if name not in config.services:
        known = ", ".join(sorted(config.services)) or "none"
        raise UsageError(f"{config.path}: services.{name}: no such service (configured: {known})")
    return name


def _check(config: Config) -> int:
    from authproxy.schemes import SCHEMES

    keys = config.inbound.keys
    print(f"{config.path}: OK")
    print(f"  listen     {config.listen}")
    print(f"  state_dir  {config.state_dir}")
    print(f"  workers    {config.workers}")
    if config.store is not None:  # the url holds no password (a config error otherwise)
        print(f"  store      {config.store.url} prefix {config.store.prefix} (encrypted with a key from {config.store.key_file})")
    print(f"  keys       {', '.join(k.name for k in keys) if keys else 'no inbound keys: any client that reaches the listener'}")
    for name, svc in config.services.items():
        SCHEMES[svc.scheme]  # registered: the loader already checked
        print(f"  {svc.prefix:<16} → {svc.upstream.url}  ({name}: {svc.scheme})")
        # Least privilege: what may be done through this service, and with which keys (names only).
        if svc.allow is None:
            print("      allow  all requests (no allow rules)")
        else:
            width = max([len("METHODS")] + [len(r.methods_text) for r in svc.allow.rules])
            print(f"      allow  {'METHODS':<{width}}  PATHS")
            for rule in svc.allow.rules:
                for i, path in enumerate(rule.paths):
                    print(f"             {rule.methods_text if i == 0 else '':<{width}}  {path}")
        users = [k.name for k in keys if k.may_use(name)]
        if not keys:
            print("      keys   any client (no inbound keys)")
        else:
            print(f"      keys   {', '.join(users) if users else 'none'}")
    if not config.services:
        print("  (no services configured)")
    return EXIT_OK


async def _with_runtime(config: Config, name: str, step: Callable[[Any], Awaitable[int]]) -> int:
    """Run one per-service command on a live runtime (the proxy's own code path), map
    its failures to exit codes, and close it without revoking: a token printed or a
    login just made must stay valid."""
    from authproxy.credentials import Unavailable
    from authproxy.runtime import ServiceRuntime
    from authproxy.schemes.base import CredentialError, NotSupported
    from authproxy.store import StoreError, open_store

    store = open_store(config)
    rt = ServiceRuntime(config.services[name], store)
    try:
        return await step(rt)
    except StoreError as e:
        print(f"authproxy: {name}: {e}", file=sys.stderr)
        return EXIT_FAIL
    except NotSupported as e:
        print(f"authproxy: {name}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CredentialError as e:
        print(f"authproxy: {name}: {e.message}", file=sys.stderr)
        return EXIT_FAIL
    except Unavailable as e:
        print(f"authproxy: {e.message}", file=sys.stderr)
        return EXIT_FAIL
    finally:
        await rt.close(revoke=False)
        await store.close()


async def _token(rt: Any, as_json: bool, obo: str | None) -> int:
    from authproxy.schemes.base import Forbidden, Keyed, UpstreamReply, exported

    key = None
    if obo is not None:
        try:
            key = rt.scheme.credential_key({"X-Authproxy-On-Behalf-Of": obo}) if isinstance(rt.scheme, Keyed) else None
        except Forbidden as e:
            print(f"authproxy: {e.message}", file=sys.stderr)
            return EXIT_USAGE
        if key is None:
            print(f"authproxy: service {rt.name} does not issue on-behalf-of tokens", file=sys.stderr)
            return EXIT_USAGE
    try:
        cred = await rt.creds.get(key)
    except UpstreamReply as e:
        print(f"authproxy: {rt.name}: the upstream refused: HTTP {e.status} {e.body[:300].decode('utf-8', 'replace')}", file=sys.stderr)
        return EXIT_FAIL
    print(json.dumps(exported(rt.scheme, cred)) if as_json else cred.token.reveal())
    return EXIT_OK


async def _logout(rt: Any) -> int:
    n = await rt.creds.logout()
    print(f"{rt.name}: revoked {n} credential{'s' if n != 1 else ''}; local state deleted")
    return EXIT_OK


def _capable(rt: Any, capability: type, missing: str) -> Any:
    """The scheme, if it has ``capability``; else the command does not apply (exit 2)."""
    from authproxy.schemes.base import NotSupported

    if not isinstance(rt.scheme, capability):
        raise NotSupported(f"scheme {rt.config.scheme} {missing}")
    return rt.scheme


async def _done(step: Awaitable[None]) -> int:
    await step
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig()
    raise SystemExit(main())
