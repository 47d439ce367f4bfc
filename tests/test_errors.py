"""The one exception hierarchy: every exception class bidmesh defines lives in
node/errors.py and descends from `BidmeshError`."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import pkgutil
from pathlib import Path

import node
from node import codec, errors


def _modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages(node.__path__, "node.")
            if not m.name.endswith("__main__")]


def test_every_exception_class_is_in_errors() -> None:
    outside = []
    for name in _modules():
        mod = importlib.import_module(name)
        for attr, obj in vars(mod).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__ == name and name != "node.errors"):
                outside.append(f"{name}.{attr}")
    assert outside == []


def test_every_error_descends_from_the_root() -> None:
    for obj in vars(errors).values():
        if (inspect.isclass(obj) and issubclass(obj, BaseException)
                and obj.__module__ == "node.errors"):
            assert issubclass(obj, errors.BidmeshError), obj


def test_reason_codes_are_their_strings_everywhere() -> None:
    """A StrEnum member is its string: on the wire, in JSON and as a counter key."""
    assert errors.Reason.MALFORMED == "malformed"
    assert json.dumps({errors.Reason.BAD_SCHEMA: errors.Reason.EOF}) == '{"bad_schema": "eof"}'
    assert codec.pack([errors.Reason.OVERSIZED]) == codec.pack(["oversized"])
    assert errors.InvalidMessage("x", errors.Reason.TRUNCATED).reason == "truncated"


def test_every_test_vector_reason_is_a_reason_code() -> None:
    vectors = json.loads((Path(__file__).parents[1] / "docs/test-vectors.json").read_text())
    reasons = {v["reason"] for v in vectors if "reason" in v}
    assert reasons and reasons <= set(errors.Reason)


# Where a reason code goes, by callee name: the positional index of the reason argument
# (a `reason=` keyword counts too). The modules below raise, send and compare reasons
# through these; a string literal there must be a `Reason` member instead.
_REASON_ARG = {
    "PeerError": 1, "InvalidMessage": 1, "InvalidEvent": 1, "Unauthorized": 1,
    "RateLimited": 1, "UntrustedAnswer": 1, "SocksError": 1, "RequestRefused": 1,
    "Refusal": 0, "TunnelRefused": 0, "TunnelUnauthorized": 0, "TunnelFailed": 0,
    # dataplane and tunnel helpers: Tunnel.fail, the refusals, answers, trailers, END
    "fail": 0, "_refuse": 1, "_refuse_session": 1, "_error_answer": 0, "_bad": 1,
    "encode_session_error": 1, "Trailer": 1, "TunnelReply": 1, "TunnelEnd": 1,
    "reply_code": 0,
}
# Counters keyed by reason (the SOCKS proxy's stats).
_REASON_COUNTERS = {"rejected", "refused", "failed"}
# A counter key that is not a reason: rejections that came without one.
_NOT_REASONS = {("node/gossip.py", "unknown")}


def _literals(e: ast.expr | None) -> list[ast.Constant]:
    """String literals that *are* the value of `e` (not inside a call or f-string)."""
    if isinstance(e, ast.Constant) and isinstance(e.value, str):
        return [e] if e.value else []  # "": no reason (a trailer that is ok)
    if isinstance(e, ast.IfExp):
        return _literals(e.body) + _literals(e.orelse)
    if isinstance(e, ast.BoolOp):
        return [c for v in e.values for c in _literals(v)]
    if isinstance(e, ast.Tuple | ast.List | ast.Set):
        return [c for v in e.elts for c in _literals(v)]
    if isinstance(e, ast.Dict):
        return [c for k in e.keys for c in _literals(k)]
    if (isinstance(e, ast.Call) and isinstance(e.func, ast.Name)
            and e.func.id in ("frozenset", "set", "tuple")):
        return [c for a in e.args for c in _literals(a)]
    return []


def _is_reason(e: ast.expr) -> bool:
    return ((isinstance(e, ast.Attribute) and e.attr == "reason")
            or (isinstance(e, ast.Name) and e.id == "reason"))


def bare_reasons(source: str) -> list[ast.Constant]:
    """String literals where a reason code goes: a reason argument (`_REASON_ARG`) or
    parameter default, a comparison with `.reason` / `reason`, a value assigned to a
    `reason` / `*REASONS` name, a map's "reason" entry, what a `*reason*` function
    returns, a key of a counter by reason."""
    found: list[ast.Constant] = []
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, ast.Call):
            f = n.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if name in _REASON_ARG:
                i = _REASON_ARG[name]
                if len(n.args) > i:
                    found += _literals(n.args[i])
                found += [c for k in n.keywords if k.arg == "reason" for c in _literals(k.value)]
        elif isinstance(n, ast.Compare):
            sides = [n.left, *n.comparators]
            if any(_is_reason(s) for s in sides):
                found += [c for s in sides for c in _literals(s)]
        elif isinstance(n, ast.Assign | ast.AnnAssign):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target]
            if any(isinstance(t, ast.Name) and "REASON" in t.id.upper() for t in targets):
                found += _literals(n.value)
        elif isinstance(n, ast.Dict):  # {"ok": False, "reason": ...}
            found += [c for k, v in zip(n.keys, n.values, strict=True)
                      if isinstance(k, ast.Constant) and k.value == "reason"
                      for c in _literals(v)]
        elif isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef):
            a = n.args
            params = [*a.posonlyargs, *a.args]
            defaults = list(zip(params[len(params) - len(a.defaults):], a.defaults, strict=True))
            defaults += [(p, d) for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True) if d]
            found += [c for p, d in defaults if p.arg == "reason" for c in _literals(d)]
            if "reason" in n.name:  # e.g. error_reason(e): what it returns is a reason
                found += [c for r in ast.walk(n) if isinstance(r, ast.Return)
                          for c in _literals(r.value)]
        elif (isinstance(n, ast.Subscript) and isinstance(n.value, ast.Attribute)
                and n.value.attr in _REASON_COUNTERS):
            found += _literals(n.slice)
    return sorted(found, key=lambda c: (c.lineno, c.col_offset))


def test_the_reason_scanner_finds_bare_literals() -> None:
    src = ('raise Unauthorized("no lease", "no_lease")\n'
           't.fail("idle", f"quiet for {s} s")\n'
           'if e.reason in ("eof", Reason.TRUNCATED): pass\n'
           'raise Unauthorized(m, e.reason if e.reason != "unauthorized" else "not_member")\n'
           'AUTH_REASONS = frozenset({"no_lease"})\n'
           'st.rejected["client_reset"] += 1\n'
           'raise PeerError(f"{n} bytes", reason="oversized")\n'
           'reason = "timeout" if timed_out else e.reason\n'
           'answer = {"ok": False, "reason": "malformed"}\n'
           'def _bad(message, reason="bad_header"): pass\n'
           'def error_reason(e):\n    return "failed"\n')
    assert [c.value for c in bare_reasons(src)] == [
        "no_lease", "idle", "eof", "unauthorized", "not_member", "no_lease", "client_reset",
        "oversized", "timeout", "malformed", "bad_header", "failed"]
    ok = ('raise Unauthorized(f"lease {x} not here", Reason.NO_LEASE)\n'
          'self.fail(OperationError("closed"))\n'
          'counters["process_refused:busy"] += 1\n'
          'stats = {"closed": st.closed, "rate_limited": st.rate_limited}\n'
          'def answer(ok, reason=None):\n    return "done"\n')
    assert bare_reasons(ok) == []


def test_every_reason_in_the_package_is_a_member() -> None:
    """Every reason node/ raises, sends, answers or compares (the dataplane, tunnels,
    SOCKS, segments, the control socket, peer ids, the light client...) is a `Reason`
    member, never a bare string."""
    root = Path(__file__).parents[1]
    paths = sorted((root / "node").rglob("*.py"))
    assert len(paths) > 50
    bare = [f"{rel}:{c.lineno}: {c.value!r}" for p in paths
            for rel in [p.relative_to(root).as_posix()] for c in bare_reasons(p.read_text())
            if (rel, c.value) not in _NOT_REASONS]
    assert bare == [], "use errors.Reason members:\n" + "\n".join(bare)
