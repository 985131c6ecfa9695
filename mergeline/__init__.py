"""mergeline's Python client: ``from mergeline.client import Client``.

It speaks the HTTP contract (DESIGN §3, §3.1, §3.2) and imports nothing from the service,
so a training script can push its fine-tune when it ends with only httpx and pydantic installed.
"""

from mergeline.client import ApiError, Client, FoldFailed, MergelineError, TransportError

__all__ = ["ApiError", "Client", "FoldFailed", "MergelineError", "TransportError"]
