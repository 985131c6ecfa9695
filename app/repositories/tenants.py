"""Queries on tenants and API tokens."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import ApiToken, Tenant


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def token_by_digest(session: Session, digest: str) -> ApiToken | None:
    return session.scalar(select(ApiToken).where(ApiToken.token_sha256 == digest))


def add_token(session: Session, tenant: Tenant, digest: str) -> ApiToken:
    token = ApiToken(tenant_id=tenant.id, token_sha256=digest)
    session.add(token)
    session.flush()
    return token


def token_digests(session: Session) -> dict[str, str]:
    """token sha256 -> tenant id, for every stored token."""
    return dict(session.execute(select(ApiToken.token_sha256, ApiToken.tenant_id)).all())


def name_of(session: Session, tenant_id: str) -> str | None:
    return session.scalar(select(Tenant.name).where(Tenant.id == tenant_id))
