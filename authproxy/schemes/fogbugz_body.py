"""FogBugz on the wire: where a request carries ``cmd`` and ``token``, and how a
reply says "not logged on".

Requests: FogBugz reads its arguments from the query string and a form-encoded,
``multipart/form-data`` or JSON-object body alike (names compared
case-insensitively), so the proxy's token goes into every place a client may
have put a placeholder, and a client's ``cmd`` is looked for in all of them.
Each rewrite keeps every byte it does not need to change.

Replies: ``<error code="3">`` in XML, ``"errors": [{"code": "3"}]`` in JSON,
possibly gzip-compressed for a client that asked for it.

Pure functions, tested directly.
"""

from __future__ import annotations

import json
import re
import zlib
from typing import Any
from urllib.parse import quote, unquote_plus
from xml.etree import ElementTree

from authproxy.schemes import multipart

PARAM = "token"
NOT_LOGGED_ON = "3"
MAX_INSPECTED = 64 * 1024  # a "not logged on" reply is tiny; never inflate more than this
FORM = "application/x-www-form-urlencoded"


def mime_of(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


# --------------------------------------------------------------------------- query strings and forms


def replace_param(query: str, name: str, value: str) -> str:
    """Drop every ``name=`` parameter (case-insensitively: FogBugz's ASP reads
    parameters that way) and append ``name=value``; other bytes stay as sent."""
    kept = [p for p in query.split("&") if p and unquote_plus(p.partition("=")[0]).lower() != name]
    kept.append(f"{quote(name, safe='')}={quote(value, safe='')}")
    return "&".join(kept)


def params(query: str, name: str) -> list[str]:
    """Every ``name`` parameter of a raw query or form string (case-insensitive name)."""
    out = []
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if unquote_plus(key).lower() == name:
            out.append(unquote_plus(value))
    return out


# --------------------------------------------------------------------------- JSON


def json_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object (a UTF-8 BOM and white space allowed before it), or None."""
    stripped = body.lstrip(b" \t\r\n").removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
    if not stripped.startswith(b"{"):
        return None
    try:
        doc = json.loads(stripped)
    except (UnicodeDecodeError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _json_object_with_token(body: bytes, token: str) -> bytes | None:
    stripped = body.lstrip(b" \t\r\n").removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
    if not stripped.startswith(b"{"):
        return None
    try:
        text = stripped.decode("utf-8")
        doc = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    pair = f"{json.dumps(PARAM)}:{json.dumps(token)}"
    if not any(k.lower() == PARAM for k in doc):
        # The usual case: insert the field, leaving every other byte as the client wrote it.
        rest = text[1:]
        sep = "" if rest.lstrip().startswith("}") else ","
        return ("{" + pair + sep + rest).encode("utf-8")
    for k in [k for k in doc if k.lower() == PARAM]:
        del doc[k]
    return json.dumps({PARAM: token, **doc}, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# --------------------------------------------------------------------------- the two questions the scheme asks


def set_body_token(body: bytes, content_type: str, token: str) -> bytes:
    """Set ``token`` in a JSON-object, form-encoded or multipart/form-data body; any
    other body is left as is. A JSON object is recognised by its content whatever the
    Content-Type says, because ``curl -d '{...}'`` labels it as a form."""
    json_body = _json_object_with_token(body, token)
    if json_body is not None:
        return json_body
    mime = mime_of(content_type)
    if mime == FORM:
        # latin-1 maps bytes 1:1, so every byte of the other fields survives the round trip.
        return replace_param(body.decode("latin-1"), PARAM, token).encode("latin-1")
    if mime == "multipart/form-data":
        rewritten = multipart.set_field(body, content_type, PARAM, token.encode("utf-8"))
        if rewritten is not None:
            return rewritten
    return body


def client_commands(query: str, body: bytes | None, content_type: str) -> tuple[list[str], bool]:
    """Every ``cmd`` the request carries (query and kept body), lower-cased and
    stripped, and whether the body is a JSON object (a JSON API request, answered
    in JSON)."""
    found = params(query, "cmd")
    doc = json_object(body) if body else None
    if doc is not None:
        found.extend(str(v) for k, v in doc.items() if k.lower() == "cmd" and isinstance(v, (str, int, float)))
    elif body:
        mime = mime_of(content_type)
        if mime == FORM:
            found.extend(params(body.decode("latin-1"), "cmd"))
        elif mime == "multipart/form-data":
            found.extend(v.decode("utf-8", "replace") for v in multipart.values(body, content_type, "cmd") or [])
    return [c.strip().lower() for c in found], doc is not None


# --------------------------------------------------------------------------- replies



_XML_REJECTION = re.compile(rb"<error\b[^>]*\bcode\s*=\s*[\"']\s*3\s*[\"']")
_JSON_REJECTION = re.compile(rb"\"code\"\s*:\s*\"?\s*3\s*\"?\s*[,}]")
_FORBIDDEN_XML = (b"<!DOCTYPE", b"<!ENTITY")


def parse_xml(body: bytes) -> ElementTree.Element | None:
    """Parse a FogBugz reply. FogBugz never sends a DTD, so any document declaring one
    is refused before parsing: no entity expansion, no external fetches."""
    head = body.upper()
    if any(marker in head for marker in _FORBIDDEN_XML):
        return None
    try:
        return ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return None


def xml_not_logged_on(body: bytes) -> bool:
    """``<response><error code="3">…</error></response>`` — cheap byte check first."""
    if _XML_REJECTION.search(body) is None:
        return False
    root = parse_xml(body)
    if root is None or root.tag != "response":
        return False
    error = root.find("error")
    return error is not None and (error.get("code") or "").strip() == NOT_LOGGED_ON


def json_not_logged_on(body: bytes) -> bool:
    """``{"errors": [{"code": "3", ...}], ...}`` — cheap byte check first."""
    if b'"errors"' not in body or _JSON_REJECTION.search(body) is None:
        return False
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errors, list):
        return False
    return any(isinstance(e, dict) and str(e.get("code", "")).strip() == NOT_LOGGED_ON for e in errors)


def content_kind(content_type: str) -> str | None:
    mime = mime_of(content_type)
    if mime.endswith("/xml") or mime.endswith("+xml"):
        return "xml"
    if mime.endswith("/json") or mime.endswith("+json"):
        return "json"
    return None


def decoder(encoding: str) -> Any:
    """A zlib window size for the reply's Content-Encoding; None for none; False if unknown."""
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return None
    if enc in ("gzip", "x-gzip"):
        return 16 + zlib.MAX_WBITS
    if enc == "deflate":
        return zlib.MAX_WBITS
    return False


def decoded(body: bytes, encoding: str) -> bytes | None:
    """The reply as sent by FogBugz, inflated (bounded) when the client asked for gzip."""
    wbits = decoder(encoding)
    if wbits is None:
        return body
    if wbits is False:
        return None
    for bits in (wbits, -zlib.MAX_WBITS) if wbits == zlib.MAX_WBITS else (wbits,):
        try:
            return zlib.decompressobj(bits).decompress(body, MAX_INSPECTED)
        except zlib.error:
            continue
    return None
