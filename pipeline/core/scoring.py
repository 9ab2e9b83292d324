"""Per-sample membership scores of a classifier, in fp32 whatever precision the model ran in.

Loss is computed from the logit margin m = z_y - logsumexp_{j != y} z_j as CE = softplus(-m): the
same number as cross-entropy, but it does not round to zero for confident predictions, so memorised
members stay distinguishable from merely easy non-members.
"""

from __future__ import annotations

import torch


def logit_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """z_y - logsumexp over the other classes, in fp32: log(p_y / (1 - p_y))."""
    logits = logits.float()
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return true - torch.logsumexp(others, dim=1)
