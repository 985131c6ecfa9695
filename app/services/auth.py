"""Bearer tokens -> tenants. Tokens come from settings and are stored only as sha256 digests."""

from __future__ import annotations

import hashlib
import hmac

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.repositories import tenants as tenants_repo
from app.services.errors import Unauthorized

# The tenant that owns everything when the server runs open (no tokens, loopback only).
OPEN_TENANT = "default"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TenantResolver:
    """Maps a request's bearer token to a tenant id, from an in-memory table of digests."""

    def __init__(self, digests: dict[str, str], open_tenant_id: str | None) -> None:
        self._digests = digests
        self.open_tenant_id = open_tenant_id

    @property
    def is_open(self) -> bool:
        return self.open_tenant_id is not None

    def resolve(self, authorization: str | None) -> str:
        if self.open_tenant_id is not None:
            return self.open_tenant_id
        if not authorization:
            raise Unauthorized("missing Authorization header: send 'Authorization: Bearer <token>'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        digest = token_digest(token.strip())
        for known, tenant_id in self._digests.items():
            if hmac.compare_digest(known, digest):
                return tenant_id
        raise Unauthorized("unknown token")


def sync_tokens(session: Session, token_map: dict[str, str]) -> TenantResolver:
    """Store the configured tokens (hashed) with their tenants; return the resolver for this process."""
    if not token_map:
        tenant = _get_or_create_tenant(session, OPEN_TENANT)
        return TenantResolver({}, tenant.id)
    for token, tenant_name in token_map.items():
        digest = token_digest(token)
        tenant = _get_or_create_tenant(session, tenant_name)
        existing = tenants_repo.token_by_digest(session, digest)
        if existing is None:
            try:
                with session.begin_nested():
                    tenants_repo.add_token(session, tenant, digest)
            except IntegrityError:  # another replica stored it first
                pass
        elif existing.tenant_id != tenant.id:
            existing.tenant_id = tenant.id
    session.flush()
    configured = {token_digest(t) for t in token_map}
    digests = {d: t for d, t in tenants_repo.token_digests(session).items() if d in configured}
    return TenantResolver(digests, None)


def _get_or_create_tenant(session: Session, name: str):  # noqa: ANN202
    try:
        with session.begin_nested():
            return tenants_repo.get_or_create_tenant(session, name)
    except IntegrityError:  # created concurrently by another replica
        return tenants_repo.get_or_create_tenant(session, name)
