"""Client of GEM knowledge serving (`gem.knowledge.v1`): `KnowledgeClient` and
`AsyncKnowledgeClient`. Generated API code in `gem.knowledge.v1`."""

from gem.knowledge.client import AsyncKnowledgeClient, KnowledgeClient, Reply
from gem.knowledge.outputs import OUTPUT_NAMES

__all__ = ["OUTPUT_NAMES", "AsyncKnowledgeClient", "KnowledgeClient", "Reply"]
