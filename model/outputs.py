"""The FM's outputs: their names, fixed by the wire contract, and the sigmoid that
turns its logits into labels."""

from __future__ import annotations

import numpy as np

# Output names of the FM, fixed by the wire contract.
LOGITS = "logits"
EMBEDDING = "embedding"
USER_EMBEDDING = "user_embedding"
FM_OUTPUTS = (LOGITS, EMBEDDING, USER_EMBEDDING)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Labels are probabilities: the sigmoid of the logits, in their dtype, without
    overflow for large negative logits (exp(-logaddexp(0, -x)))."""
    return np.exp(-np.logaddexp(0, -logits))
