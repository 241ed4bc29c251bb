"""The documentation stays navigable and its set-up contract stays true.

* Every relative link and every ``#anchor`` in README.md and docs/**/*.md
  resolves: the file (or folder) exists, and the anchor is a heading of the
  target page under GitHub's slug rules (lower-case; punctuation other than
  ``-`` and ``_`` removed; each space a ``-``; a repeated heading gets ``-1``,
  ``-2``, ...). Headings and links inside fenced code blocks do not count.
* README.md shows the two set-up commands: one that runs ``authproxy demo``
  on its built-in default, and the test command, byte-identical to the one
  ``.ci/run`` runs.
* config.example.yaml documents forward-proxy mode: the ``forward_proxy``
  block with its defaults, and a ``hosts:`` example that loads once uncommented.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from authproxy.config import ForwardProxyConfig, load_config, load_config_text

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README] + sorted(DOCS.rglob("*.md"))

# The pages README.md promises (docs/performance.md is written separately and
# linked only once it exists).
EXPECTED = [
    "configuration.md",
    "schemes/static.md",
    "schemes/fogbugz.md",
    "schemes/oauth2.md",
    "schemes/app-token.md",
    "least-privilege.md",
    "forward-proxy.md",
    "operations.md",
    "security.md",
    "troubleshooting.md",
    "architecture.md",
]

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) and ![alt](target); the target ends at whitespace or ')'.
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HTML_ANCHOR = re.compile(r"""<a\s+(?:name|id)=["']([^"']+)["']""")
_INLINE_CODE = re.compile(r"`[^`]*`")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out: list[str] = []
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's heading anchor (github-slugger): lower-case, punctuation removed
    (letters, digits, '_', '-' and spaces kept), each space a '-'."""
    text = re.sub(r"<[^>]+>", "", heading)  # inline HTML tags
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading: its text
    text = text.lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in "-_ " or ch.isspace())
    return re.sub(r"\s", "-", text)


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        m = _HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
        out.update(a.lower() for a in _HTML_ANCHOR.findall(line))
    return out


def links(path: Path) -> list[str]:
    found: list[str] = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        found.extend(_LINK.findall(_INLINE_CODE.sub("``", line)))
    return found


def test_slug_follows_github() -> None:
    assert slug("Unmodified tools: `authproxy exec`") == "unmodified-tools-authproxy-exec"
    assert slug("OAuth 2.0 (Bugfender and others)") == "oauth-20-bugfender-and-others"
    assert slug("…or with an email and password") == "or-with-an-email-and-password"
    assert slug("A → B") == "a--b"
    assert slug("keep_under-scores") == "keep_under-scores"


def test_the_promised_pages_exist() -> None:
    missing = [p for p in EXPECTED if not (DOCS / p).is_file()]
    assert not missing, f"docs/ lacks {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_and_anchor_resolves(page: Path) -> None:
    problems: list[str] = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / unquote(file_part)).resolve() if file_part else page
        if not dest.exists():
            problems.append(f"{target}: {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest} does not exist")
            continue
        if not dest.is_relative_to(REPO):
            problems.append(f"{target}: points outside the repository")
            continue
        if anchor:
            if dest.is_dir() or dest.suffix != ".md":
                problems.append(f"{target}: an anchor into something that is not a Markdown page")
            elif unquote(anchor).lower() not in anchors(dest):
                problems.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not problems, f"{page.relative_to(REPO)}:\n  " + "\n  ".join(problems)


def test_every_docs_page_is_linked_from_the_readme_or_another_page() -> None:
    linked: set[Path] = set()
    for page in PAGES:
        for target in links(page):
            file_part = target.partition("#")[0]
            if file_part and not re.match(r"^[a-z][a-z0-9+.-]*:", file_part, re.I):
                linked.add((page.parent / unquote(file_part)).resolve())
    # docs/performance.md is written by the benchmark's owner; README's Performance
    # section links it once it is summarised there.
    orphans = [str(p.relative_to(REPO)) for p in PAGES[1:] if p.resolve() not in linked and p.name != "performance.md"]
    assert not orphans, f"pages nothing links to: {orphans}"


# --------------------------------------------------------------------------- the set-up contract


def ci_test_command() -> str:
    """The line of .ci/run that runs README's test command."""
    lines = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()]
    found = [ln for ln in lines if ln.startswith("pip install") and ln.endswith("pytest")]
    assert len(found) == 1, f".ci/run: expected one 'pip install ... pytest' line, found {found}"
    return found[0]


def readme_commands() -> list[str]:
    """The lines of README.md's sh code blocks."""
    out: list[str] = []
    fenced = False
    for line in README.read_text(encoding="utf-8").splitlines():
        m = _FENCE.match(line)
        if m:
            fenced = not fenced and line.strip() in ("```sh", "```bash", "```shell", "```console")
            continue
        if fenced:
            out.append(line.strip())
    return out


def test_readme_has_the_two_set_up_commands() -> None:
    commands = readme_commands()
    test_cmd = ci_test_command()
    assert test_cmd == "pip install -e '.[test]' && pytest"  # the contract itself
    assert test_cmd in commands, f"README.md must show the test command exactly as .ci/run runs it: {test_cmd}"
    demo = [c for c in commands if re.fullmatch(r"pip install \S+ && authproxy demo", c)]
    assert demo, "README.md must show one command that installs authproxy and runs `authproxy demo` (its built-in default)"
    text = README.read_text(encoding="utf-8")
    assert text.index(demo[0]) < text.index(test_cmd) < len(text) // 3, "both set-up commands come first"


# --------------------------------------------------------------------------- config.example.yaml


def test_example_config_documents_forward_proxy_mode() -> None:
    path = REPO / "config.example.yaml"
    cfg = load_config(path, env={})
    assert cfg.forward_proxy == ForwardProxyConfig()  # the defaults, spelled out
    assert "forward_proxy:" in path.read_text()
    assert cfg.services["echo"].hosts == ()

    # The commented forward-proxy service loads once uncommented.
    lines = path.read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("  # github:"))
    block = []
    for ln in lines[start:]:
        if not ln.startswith("  #   ") and not ln.startswith("  # github:"):
            break
        block.append(ln.replace("  # ", "  ", 1))
    text = "services:\n" + "\n".join(block).replace("token_file: /run/secrets/github-token", "token: t0k") + "\n"
    svc = load_config_text(text, env={}).services["github"]
    assert svc.hosts == ("api.github.com",) and svc.upstream.port == 443
