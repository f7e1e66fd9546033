"""Who is calling: API keys to tenants, and the admin key.

Every hash chain the engine builds is salted by its session's tenant, so a tenant can
neither hit nor probe another tenant's cached blocks (`cached_tokens` would otherwise be
a block-granular membership oracle). This module decides the tenant of a request:

- **With keys** (a keys file, or `PAGEDKV_API_KEYS`): each API key maps to a tenant; a
  request without a known key is refused (HTTP 401 `invalid_api_key`, as the API answers;
  a WebSocket handshake is refused with 401 too). Several keys may share a tenant (they
  then share its cache).
- **Without keys**: each distinct bearer token is a tenant of its own, named by a keyed
  hash of the token (the token itself is never kept or logged); requests without one
  share the `anonymous` tenant. Isolation between clients that present different tokens
  holds by default.

The admin key (`--admin-key`, `PAGEDKV_ADMIN_KEY`, or `"admin": true` in the keys file)
opens `/v1/engine/stats`; without one configured that endpoint is closed.

Keys are compared by a keyed BLAKE2b digest looked up in a dict, never by `==` on the
key text, so the lookup time does not depend on how much of a guess matches.

Keys file (JSON; per-tenant limits in the same file: `pagedkv.serving.quotas`):

    {"keys": [{"key": "sk-...", "tenant": "acme"},
              {"key": "sk-...", "tenant": "ops", "admin": true}],
     "default_limits": {"max_connections": 16},
     "tenants": {"acme": {"max_pinned_sessions": 32}}}

`PAGEDKV_API_KEYS`: `key=tenant` pairs separated by commas.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ANONYMOUS_TENANT",
    "AuthError",
    "Authenticator",
    "Caller",
    "auth_fingerprint",
    "auth_secret_for",
    "load_authenticator",
    "read_keys_file",
]

ANONYMOUS_TENANT = "anonymous"
MAX_KEY_BYTES = 512  # longer Authorization values are refused unread
TENANT_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
MAX_KEYS_FILE_BYTES = 4 * 1024 * 1024


class AuthError(Exception):
    """The request's credentials are missing or wrong (HTTP 401 / a refused handshake)."""

    def __init__(self, message: str, *, code: str = "invalid_api_key", status: int = 401):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status

    def to_json(self) -> dict[str, object]:
        return {
            "message": self.message,
            "type": "invalid_request_error",
            "param": None,
            "code": self.code,
        }


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated caller: its tenant, and whether it holds the admin key."""

    tenant: str
    admin: bool = False


@dataclass(eq=False)
class Authenticator:
    """Maps an `Authorization` header to a `Caller` (see the module docstring).

    Attributes:
        keys: digest of each configured API key -> its caller; empty: each bearer token
            is its own tenant.
        secret: the key of the digests (random per process unless given).
    """

    keys: dict[bytes, Caller] = field(default_factory=dict)
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    admin_digests: frozenset[bytes] = frozenset()

    @classmethod
    def from_keys(
        cls,
        keys: Mapping[str, str],
        *,
        admin_keys: tuple[str, ...] = (),
        secret: bytes | None = None,
    ) -> Authenticator:
        """From `{api_key: tenant}`; `admin_keys` open the admin endpoints (they need
        not be in `keys`).

        Raises:
            ValueError: an empty or over-long key, or a tenant name outside
                `[A-Za-z0-9_.-]{1,64}`.
        """
        auth = cls(secret=secret if secret is not None else secrets.token_bytes(32))
        admins = {auth._digest(_check_key(k)) for k in admin_keys}
        for key, tenant in keys.items():
            if not isinstance(tenant, str) or not TENANT_RE.match(tenant):
                raise ValueError(
                    f"tenant name {tenant!r} must be 1-64 characters of [A-Za-z0-9_.-]"
                )
            if tenant == ANONYMOUS_TENANT:
                raise ValueError(f"tenant name {tenant!r} is reserved")
            digest = auth._digest(_check_key(key))
            auth.keys[digest] = Caller(tenant, admin=digest in admins)
        auth.admin_digests = frozenset(admins)
        return auth

    @property
    def requires_keys(self) -> bool:
        return bool(self.keys)

    @property
    def tenants(self) -> frozenset[str]:
        """The tenants of the configured keys (empty without keys)."""
        return frozenset(c.tenant for c in self.keys.values())

    @property
    def has_admin(self) -> bool:
        return bool(self.admin_digests)

    def _digest(self, key: str) -> bytes:
        return hmac.digest(self.secret, key.encode("utf-8", "surrogatepass"), "blake2b")

    def caller(self, authorization: str | None) -> Caller:
        """The caller of a request with this `Authorization` header value.

        Raises:
            AuthError: keys are configured and the header holds none of them, or the
                header is malformed.
        """
        token = _bearer(authorization)
        if not self.keys:
            if token is None:
                return Caller(ANONYMOUS_TENANT)
            digest = self._digest(token)
            return Caller("key-" + digest[:12].hex(), admin=digest in self.admin_digests)
        if token is None:
            raise AuthError(
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code="missing_api_key",
            )
        caller = self.keys.get(self._digest(token))
        if caller is None:
            raise AuthError("Incorrect API key provided.")
        return caller

    def check_admin(self, authorization: str | None) -> None:
        """Raise `AuthError` unless the header holds an admin key (403 when no admin key
        is configured at all)."""
        if not self.admin_digests:
            raise AuthError(
                "this endpoint needs an admin key, and the server has none configured "
                "(pagedkv serve --admin-key or PAGEDKV_ADMIN_KEY)",
                code="admin_key_required",
                status=403,
            )
        token = _bearer(authorization)
        if token is None or self._digest(token) not in self.admin_digests:
            raise AuthError("this endpoint needs the admin key", code="admin_key_required")


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not key.strip() or len(key.encode()) > MAX_KEY_BYTES:
        raise ValueError(f"an API key must be a non-empty string of at most {MAX_KEY_BYTES} bytes")
    if any(c.isspace() for c in key):
        raise ValueError("an API key must not contain whitespace")
    return key


def _bearer(authorization: str | None) -> str | None:
    """The token of `Bearer <token>`, None when there is no header.

    Raises:
        AuthError: a header that is not `Bearer <token>`, or an over-long one.
    """
    if authorization is None or not authorization.strip():
        return None
    if len(authorization) > MAX_KEY_BYTES + 16:
        raise AuthError("the Authorization header is too long")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise AuthError("the Authorization header must be 'Bearer <API key>'")
    return token


KEYS_FILE_FIELDS = ("keys", "default_limits", "tenants")


def read_keys_file(path: Path) -> dict[str, object]:
    """The keys file's JSON object (`keys`, and the limits `pagedkv.serving.quotas`
    reads: `default_limits`, `tenants`).

    Raises:
        ValueError: unreadable, too large, not JSON, not an object, or an unknown
            top-level field (a typo would otherwise silently drop a limit).
    """
    try:
        size = path.stat().st_size
        if size > MAX_KEYS_FILE_BYTES:
            raise ValueError(f"keys file {path} is larger than {MAX_KEYS_FILE_BYTES} bytes")
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"cannot read keys file {path}: {err.strerror or err}") from None
    except (ValueError, UnicodeDecodeError) as err:
        if str(err).startswith("keys file"):
            raise
        raise ValueError(f"keys file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f'keys file {path}: expected an object {{"keys": [...], ...}}')
    unknown = sorted(str(k) for k in data if k not in KEYS_FILE_FIELDS)
    if unknown:
        raise ValueError(f"keys file {path}: unknown fields {unknown}; expected some of "
                         f"{list(KEYS_FILE_FIELDS)}")  # fmt: skip
    return data


def auth_secret_for(hash_secret: bytes | None) -> bytes | None:
    """The digest key of replicas (and a router) sharing a block-hash secret: with it
    they all map a bare bearer token to the same tenant (None: none shared)."""
    if hash_secret is None:
        return None
    return hashlib.blake2b(hash_secret, person=b"pagedkv-auth").digest()


def auth_fingerprint(auth: Authenticator) -> str:
    """A short digest of how `auth` maps keys to tenants ("open" without keys): two
    authenticators with the same secret and keys file agree on it, so a router can tell
    whether it resolves tenants as a replica does. Reveals neither keys nor digests."""
    if not auth.keys:
        return "open"
    h = hashlib.blake2b(digest_size=8, person=b"pagedkv-authfp")
    for digest, caller in sorted(auth.keys.items()):
        h.update(digest)
        h.update(caller.tenant.encode() + b"\x00")
    return h.hexdigest()


def load_authenticator(
    keys_file: str | Path | None = None,
    *,
    admin_key: str | None = None,
    environ: Mapping[str, str] | None = None,
    secret: bytes | None = None,
) -> Authenticator:
    """The server's authenticator from a keys file, `PAGEDKV_API_KEYS`,
    `PAGEDKV_ADMIN_KEY` and `admin_key` (see the module docstring). `secret` keys the
    digests (default: random per process); replicas that must map a bearer token to the
    same tenant without a keys file pass the same one.

    Raises:
        ValueError: a malformed keys file or variable, naming what is wrong (the keys
            themselves are never echoed).
    """
    env = os.environ if environ is None else environ
    keys: dict[str, str] = {}
    admins: list[str] = []
    if keys_file is not None:
        path = Path(keys_file)
        data = read_keys_file(path)
        entries = data.get("keys")
        if not isinstance(entries, list):
            raise ValueError(f'keys file {path}: expected {{"keys": [...]}} (a list, '
                             "empty for none)")  # fmt: skip
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
                raise ValueError(f"keys file {path}: keys[{i}] needs a string 'key'")
            tenant = entry.get("tenant")
            if not isinstance(tenant, str):
                raise ValueError(f"keys file {path}: keys[{i}] needs a string 'tenant'")
            admin = entry.get("admin", False)
            if not isinstance(admin, bool):
                raise ValueError(f"keys file {path}: keys[{i}].admin must be true or false")
            if entry["key"] in keys:
                raise ValueError(f"keys file {path}: keys[{i}] repeats an earlier key")
            keys[entry["key"]] = tenant
            if admin:
                admins.append(entry["key"])
    for i, pair in enumerate(p for p in env.get("PAGEDKV_API_KEYS", "").split(",") if p.strip()):
        key, sep, tenant = pair.strip().partition("=")
        if not sep:
            raise ValueError(f"PAGEDKV_API_KEYS: entry {i} is not key=tenant")
        keys[key] = tenant
    for extra in (env.get("PAGEDKV_ADMIN_KEY"), admin_key):
        if extra:
            admins.append(extra)
    try:
        return Authenticator.from_keys(keys, admin_keys=tuple(admins), secret=secret)
    except ValueError as err:
        raise ValueError(f"API keys: {err}") from None
