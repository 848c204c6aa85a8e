"""API keys -> tenants, what each tenant may use, and what it has used.

Keys are stored as SHA-256 hashes: API keys are long random tokens, so a fast hash is enough (a slow password
hash would cost CPU on every request), and a leaked config does not leak keys. Every stored hash is compared
with `hmac.compare_digest`, without an early exit, so response time says nothing about which hash was close.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from serve.config import Limits, TenantConfig

UNKNOWN = "unknown"  # the tenant label of requests whose key matched no tenant


def hash_key(key: str) -> str:
    """The form a key is stored in a config: `sha256:<hex>`."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def bearer_key(authorization: str | None) -> str | None:
    """The key in an `Authorization: Bearer KEY` header (the OpenAI clients send exactly that)."""
    if not authorization:
        return None
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


def key_matches(key: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_key(key).encode(), stored_hash.encode())


NANO = 1_000_000_000


@dataclass
class Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_nano_usd: int = 0  # integer nano-dollars: a sum is exact in any order, before and after a restart

    @property
    def cost_usd(self) -> float:
        return self.cost_nano_usd / NANO


@dataclass
class Tenant:
    name: str
    models: set[str]  # '*' = every model
    limits: Limits
    config: TenantConfig
    usage: Usage = field(default_factory=Usage)
    restricted: dict[str, set[str]] = field(default_factory=dict)  # the TenantStore's: model -> who may use it

    def may_use(self, model: str) -> bool:
        """A model granted by name; or, with '*', any model not restricted to named tenants: never a version or
        fine-tuned model another tenant owns, nor an alias the operator gave to others (tests/serve/test_attacks.py)."""
        if model in self.models:
            return True
        allowed = self.restricted.get(model)
        return self.name in allowed if allowed is not None else "*" in self.models


class TenantStore:
    def __init__(self, tenants: list[TenantConfig]):
        # run-time models for named tenants only (a tenant's own versions, aliases with a tenant list): outside '*'
        self.restricted: dict[str, set[str]] = {}
        self.tenants = {t.name: Tenant(t.name, set(t.models), t.limits, t, restricted=self.restricted)
                        for t in tenants}  # fmt: skip
        self._hashes = [(h, t.name) for t in tenants for h in t.api_key_hashes]

    def authenticate(self, key: str | None) -> Tenant | None:
        if not key:
            return None
        digest = hash_key(key).encode()
        found = None
        for stored, name in self._hashes:
            # No early exit: every request costs the same comparisons whichever key it carries.
            if hmac.compare_digest(digest, stored.encode()):
                found = name
        return self.tenants[found] if found else None

    def grant(self, model: str, tenant_names: list[str]) -> None:
        for name in tenant_names:
            self.tenants[name].models.add(model)

    def revoke(self, model: str, tenant_names: list[str] | None = None) -> None:
        """Take `model` from these tenants (None: from all), unless their config names it."""
        for t in self.tenants.values():
            if tenant_names is None or (t.name in tenant_names and model not in t.config.models):
                t.models.discard(model)

    def restrict(self, model: str, tenants: list[str] | set[str] | None) -> None:
        """Who may use a run-time model besides explicit grants: these tenants only; None or empty: every '*'."""
        if tenants:
            self.restricted[model] = set(tenants)
        else:
            self.restricted.pop(model, None)
