"""What an owner's audit sees of a model, and the per-image score it computes from that.

Owners rarely hold a model's logits: an API returns probabilities, often only the top K of them,
sometimes only a label. Each access level has its own per-image score; any such score keeps the
audit's permutation test exact (the published candidate and the drawn ones are scored alike), so
what changes between levels is power and the number of queries. Scores are loss-like: lower means
the model knows the image better.

- `logits`: (images, classes) logits. Score: cross-entropy of the image's label (from the logit
  margin, exact in fp32 even when the model is very sure).
- `probs`: (images, classes) probabilities, every row summing to 1. Score: -log p(label), with p
  floored at 1e-30 (a probability that has rounded to 0 says less than a logit would).
- `topk:K`: a pair (classes, probabilities), each (images, K): the K best classes. Score: -log p(label)
  when the label is among them; otherwise censored at the most the label could have,
  -log min(smallest listed p, 1 - sum of listed p).
- `label`: (images,) predicted classes. Score: the share of VIEWS (the image, its mirror, and shifts
  of 2 pixels: a trainer's usual augmentations) whose predicted class is not the label; a model
  that memorised an image keeps its label under small changes (label-only membership inference,
  Choquette-Choo et al., ICML 2021). Costs len(VIEWS) queries per image (`views`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..core.scoring import logit_margin
from ..store import StageError

LEVELS = ("logits", "probs", "topk:K", "label")
SHIFT = 2  # pixels, each way, for the label level's shifted views
SUM_TOLERANCE = 1e-3  # how far a row of probabilities may sum from 1 (float32 APIs, rounding)


def _shifted(batch: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The images moved by (dy, dx) pixels, the border repeated into the gap (as a padded crop)."""
    pad = F.pad(batch.float(), (SHIFT, SHIFT, SHIFT, SHIFT), mode="replicate").to(batch.dtype)
    h, w = batch.shape[-2:]
    return pad[..., SHIFT - dy : SHIFT - dy + h, SHIFT - dx : SHIFT - dx + w]


VIEWS = (
    lambda b: b,
    lambda b: b.flip(-1),
    lambda b: _shifted(b, SHIFT, 0),
    lambda b: _shifted(b, -SHIFT, 0),
    lambda b: _shifted(b, 0, SHIFT),
    lambda b: _shifted(b, 0, -SHIFT),
    lambda b: _shifted(b.flip(-1), SHIFT, SHIFT),
    lambda b: _shifted(b.flip(-1), -SHIFT, -SHIFT),
)


@dataclass(frozen=True)
class Access:
    """One access level (`Access.parse("topk:5")`); see the module's docstring."""

    level: str = "logits"  # logits, probs, topk, label
    k: int | None = None  # topk's K

    @classmethod
    def parse(cls, text: str) -> Access:
        if text in ("logits", "probs", "label"):
            return cls(text)
        if match := re.fullmatch(r"topk:([0-9]{1,6})", text):
            if int(match[1]) >= 1:
                return cls("topk", int(match[1]))
        raise StageError(f"--access {text}: expected one of {', '.join(LEVELS)} (K a whole number of at least 1)")

    def __str__(self) -> str:
        return f"topk:{self.k}" if self.level == "topk" else self.level

    @property
    def views(self) -> tuple[Any, ...]:
        return VIEWS if self.level == "label" else VIEWS[:1]

    def check(self, out: Any, n: int, name: str) -> Any:
        """The callable's output for `n` images, as this level expects it (tensors on the CPU); any
        other shape or content is one line naming the callable and the level."""
        want = f"{name}: for --access {self}, expected"
        try:
            if self.level == "topk":
                if not isinstance(out, tuple | list) or len(out) != 2:
                    raise StageError(f"{want} a pair (classes, probabilities), found {type(out).__name__}")
                classes = torch.as_tensor(out[0]).detach().cpu()
                probs = torch.as_tensor(out[1]).detach().double().cpu()
                if classes.shape != (n, self.k) or probs.shape != (n, self.k):
                    raise StageError(
                        f"{want} classes and probabilities of shape ({n}, {self.k}), found "
                        f"{tuple(classes.shape)} and {tuple(probs.shape)}"
                    )
                if classes.is_floating_point() or classes.dtype == torch.bool:
                    raise StageError(f"{want} whole-number classes, found {classes.dtype}")
                _check_probabilities(probs, want, partial=True)
                return classes.long(), probs
            tensor = torch.as_tensor(out).detach().cpu()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise StageError(f"{want} tensors or arrays, found {type(out).__name__} ({exc})") from None
        if self.level == "label":
            if tensor.shape != (n,) or tensor.is_floating_point() or tensor.dtype == torch.bool:
                raise StageError(f"{want} ({n},) whole-number classes, found {tuple(tensor.shape)} {tensor.dtype}")
            return tensor.long()
        tensor = tensor.double() if self.level == "probs" else tensor.float()
        if tensor.ndim != 2 or tensor.shape[0] != n or tensor.shape[1] < 2:
            raise StageError(f"{want} shape ({n}, classes) with at least 2 classes, found {tuple(tensor.shape)}")
        if not torch.isfinite(tensor).all():
            raise StageError(f"{want} finite {self.level}, found NaN or infinite values")
        if self.level == "probs":
            _check_probabilities(tensor, want, partial=False)
        return tensor

    def classes(self, out: Any) -> int | None:
        """How many classes the output shows (None where the level does not tell)."""
        return int(out.shape[1]) if self.level in ("logits", "probs") else None

    def scores(self, outs: list[Any], label: int) -> np.ndarray:
        """Per-image scores from the checked outputs of every view (one per view)."""
        n = len(outs[0][0]) if self.level == "topk" else len(outs[0])
        labels = torch.full((n,), label)
        if self.level == "logits":
            return F.softplus(-logit_margin(outs[0], labels)).numpy()
        if self.level == "probs":
            return (-torch.log(outs[0][:, label].clamp_min(1e-30))).numpy()
        if self.level == "topk":
            classes, probs = outs[0]
            hit = classes == label
            bound = torch.minimum(probs.min(1).values, (1 - probs.sum(1)).clamp_min(0))
            return (-torch.log(torch.where(hit.any(1), (probs * hit).sum(1), bound).clamp_min(1e-30))).numpy()
        return 1 - torch.stack([out == label for out in outs]).float().mean(0).numpy()

    def restrict(self, logits: torch.Tensor) -> Any:
        """What an API at this level returns for a model with these logits: how the owner-audit
        benchmark gives a trained network each level of access."""
        if self.level == "logits":
            return logits
        probs = logits.double().softmax(1)
        if self.level == "probs":
            return probs
        if self.level == "label":
            return logits.argmax(1)
        top = probs.topk(min(self.k or 1, probs.shape[1]), dim=1)
        return top.indices, top.values


def _check_probabilities(probs: torch.Tensor, want: str, partial: bool) -> None:
    if not torch.isfinite(probs).all() or (probs < 0).any() or (probs > 1 + SUM_TOLERANCE).any():
        raise StageError(f"{want} probabilities in [0, 1]; these are not (logits? use --access logits)")
    sums = probs.sum(1)
    if (sums > 1 + SUM_TOLERANCE).any() or (not partial and ((sums - 1).abs() > SUM_TOLERANCE).any()):
        worst = float(sums[(sums - 1).abs().argmax()])
        raise StageError(f"{want} rows of probabilities summing to {'at most ' if partial else ''}1, found {worst:.4g}")
