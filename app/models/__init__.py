"""SQLAlchemy ORM models; ``Base.metadata`` is what Alembic's env.py targets."""

from app.models.alias import Alias, AliasMove
from app.models.base import Base, new_id, utcnow
from app.models.evaluation import Evaluation, EvaluationStatus
from app.models.expert import Expert
from app.models.fold_part import FoldPart, FoldPartStatus
from app.models.stream import Stream
from app.models.tenant import ApiToken, Tenant
from app.models.upload_session import UploadFile, UploadSession, UploadStatus
from app.models.version import Version, VersionStatus

__all__ = [
    "Alias",
    "AliasMove",
    "ApiToken",
    "Base",
    "Evaluation",
    "EvaluationStatus",
    "Expert",
    "FoldPart",
    "FoldPartStatus",
    "Stream",
    "Tenant",
    "UploadFile",
    "UploadSession",
    "UploadStatus",
    "Version",
    "VersionStatus",
    "new_id",
    "utcnow",
]
