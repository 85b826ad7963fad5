"""API tokens: roles, the stored record, hashing, and what each role may do (pure: no I/O).

A scoped token is `sigma.ID.SECRET` (ID: 16 hex digits, SECRET: 64). etcd keeps, under
`tokens/ID`, a `TokenRecord` with the SHA-256 of the whole token, never the token: reading
etcd does not give a working token. The bootstrap token of the master's config is an admin
token that is never stored.

Roles (DESIGN.md §6a):
- `admin`: everything, tokens and the audit log included;
- `operator` of listed namespaces: changes apps and instances of those namespaces only; reads
  the whole cluster (nodes, pool, apps, instances and events of every namespace) like a
  reader. Namespaces separate who may change what, not who may see what: an app's spec
  (its `env` included) is visible to every token holder;
- `reader`: reads only (what an operator reads).

Invariants:
- a token is checked by its ID's record and a constant-time compare of hashes; a token
  whose record is revoked (`revoked` > 0) never authenticates again;
- `allowed` decides from the route's pattern and the method alone; a change not listed in
  `SCOPED` is admin-only (deny by default), so a new route is never open to operators by
  accident.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import re
import secrets
from dataclasses import dataclass, field
from enum import StrEnum

from sigmad.errors import Forbidden, SpecError
from sigmad.spec import MAX_NAME, NAME_RE

BOOTSTRAP = "bootstrap"  # the id and name of the config's admin token
TOKEN_RE = re.compile(r"sigma\.([0-9a-f]{16})\.([0-9a-f]{64})")
TOKEN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,62}")
MAX_NAMESPACES = 64
# Tokens shipped in examples and docs, and words that only a placeholder contains.
PLACEHOLDERS = ("change-me-0123456789abcdef",)
PLACEHOLDER_WORDS = ("changeme", "change-me", "change_me", "replaceme", "replace-me",
                     "placeholder", "example", "your-token", "yourtoken", "password")
MIN_DISTINCT = 8  # characters: fewer is a pattern, not a secret
MAX_RUN = 8  # a run of consecutive characters (01234567) this long, or half the token, is a
# pattern (a random 48-hex-digit token has a run of 24 with odds below 1e-20)


class Role(StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    READER = "reader"


@dataclass(slots=True)
class TokenRecord:
    """A scoped token as etcd keeps it (`tokens/ID`)."""

    id: str
    name: str
    role: Role
    namespaces: list[str]
    hash: str  # sha256 hex of the whole token
    created: float
    revoked: float = 0.0  # time of revocation; 0 while valid


@dataclass(frozen=True)
class Principal:
    """Who makes a request: a token's id, name, role and namespaces (operators)."""

    id: str
    name: str
    role: Role
    namespaces: frozenset[str] = field(default_factory=frozenset)

    def may_change(self, namespace: str) -> bool:
        return self.role is Role.ADMIN or (
            self.role is Role.OPERATOR and namespace in self.namespaces)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> tuple[str, str]:
    """A fresh (id, token)."""
    token_id = secrets.token_hex(8)
    return token_id, f"sigma.{token_id}.{secrets.token_hex(32)}"


def token_id(token: str) -> str | None:
    """The id of a scoped token, None for anything else (e.g. the bootstrap token)."""
    found = TOKEN_RE.fullmatch(token)
    return found.group(1) if found else None


def matches(record: TokenRecord, token: str) -> bool:
    """`token` is the one `record` was made for (constant time; revoked or not)."""
    return hmac.compare_digest(record.hash, digest(token))


def same_secret(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def weakness(token: str) -> str | None:
    """Why `token` must not guard a cluster (None when it may): a known placeholder, a
    placeholder word, too few distinct characters or a run like 01234567."""
    lowered = token.lower()
    if lowered in PLACEHOLDERS or any(w in lowered for w in PLACEHOLDER_WORDS):
        return "is a placeholder from an example"
    if len(set(token)) < MIN_DISTINCT:
        return f"has fewer than {MIN_DISTINCT} distinct characters"
    run, longest = 1, max(MAX_RUN, len(token) // 2)
    for a, b in itertools.pairwise(token):
        run = run + 1 if abs(ord(b) - ord(a)) == 1 else 1
        if run >= longest:
            return f"contains a run of {longest} consecutive characters (like 01234567)"
    return None


def principal(record: TokenRecord) -> Principal:
    return Principal(record.id, record.name, record.role, frozenset(record.namespaces))


def new_record(name: object, role: object, namespaces: object, now: float
               ) -> tuple[TokenRecord, str]:
    """A validated record and its token from a create request's fields (SpecError names the
    bad field)."""
    if not isinstance(name, str) or not TOKEN_NAME_RE.fullmatch(name):
        raise SpecError("name", "must be 1 to 63 letters, digits, '.', '_', '@' or '-', "
                        "starting with a letter or digit")
    if role not in [r.value for r in Role]:
        raise SpecError("role", "must be admin, operator or reader")
    kind = Role(str(role))
    spaces = [] if namespaces is None else namespaces
    if not isinstance(spaces, list) or len(spaces) > MAX_NAMESPACES:
        raise SpecError("namespaces", f"must be a list of at most {MAX_NAMESPACES} namespaces")
    for i, ns in enumerate(spaces):
        if not isinstance(ns, str) or not NAME_RE.fullmatch(ns) or len(ns) > MAX_NAME:
            raise SpecError(f"namespaces[{i}]", f"{ns!r} is not a valid namespace name")
    if kind is Role.OPERATOR and not spaces:
        raise SpecError("namespaces", "an operator needs at least one namespace")
    if kind is not Role.OPERATOR and spaces:
        raise SpecError("namespaces", f"only operators have namespaces (a {kind.value} "
                        "token reaches every namespace)")
    ident, token = new_token()
    return TokenRecord(ident, name, kind, sorted(set(spaces)), digest(token), now), token


# -- what each role may do -------------------------------------------------------------------

READ_METHODS = frozenset({"GET", "HEAD"})
# Reads that only an admin may make.
ADMIN_READS = frozenset({"/v1/tokens", "/v1/audit", "/v1/backup"})
# Changes open to operators: route pattern → how its namespace is found. "path": the
# route's {ns}; "body": the handler calls `check_namespaces` with every namespace it writes.
SCOPED: dict[tuple[str, str], str] = {
    ("PUT", "/v1/apps"): "body",
    ("DELETE", "/v1/apps/{ns}/{app}"): "path",
    ("POST", "/v1/apps/{ns}/{app}/resources"): "path",
    ("POST", "/v1/apps/{ns}/{app}/release"): "path",
    ("POST", "/v1/apps/{ns}/{app}/undo"): "path",
    ("POST", "/v1/apps/{ns}/{app}/rollout/{action}"): "path",
    ("POST", "/v1/instances/{ns}/{name}/migrate"): "path",
    ("POST", "/v1/instances/{ns}/{name}/exec"): "path",
    ("POST", "/v1/configs/{ns}/{name}"): "path",
    ("POST", "/v1/configs/{ns}/{name}/rollback"): "path",
    ("DELETE", "/v1/configs/{ns}/{name}"): "path",
}


def allowed(who: Principal, method: str, route: str, namespace: str | None) -> str | None:
    """Why `who` may not call `method route` (None: allowed, or for a "body" route allowed
    so far: the handler checks each namespace it writes)."""
    if who.role is Role.ADMIN:
        return None
    if method in READ_METHODS:
        return "only an admin token may read this" if route in ADMIN_READS else None
    if who.role is Role.READER:
        return f"token {who.name} is read-only"
    how = SCOPED.get((method, route))
    if how is None:
        return f"only an admin token may do this (token {who.name} is an operator)"
    if how == "path" and not who.may_change(namespace or ""):
        return _not_yours(who, namespace or "")
    return None


def check_namespaces(who: Principal, namespaces: set[str]) -> None:
    """Forbidden unless `who` may change every one of `namespaces`."""
    for ns in sorted(namespaces):
        if not who.may_change(ns):
            raise Forbidden(_not_yours(who, ns))


def _not_yours(who: Principal, namespace: str) -> str:
    spaces = ", ".join(sorted(who.namespaces)) or "none"
    return (f"token {who.name} may change namespaces {spaces} only, not {namespace!r}: "
            "ask an admin for a token of that namespace")
