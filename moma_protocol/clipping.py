"""A site's update bounded in L2 norm: client-level DP's clipping, the same at both ends.

Under ``client-dp = site-clipping`` the site clips (:func:`clip_update`) and the coordinator
measures (:func:`update_norm`) with these functions, which are Flower's
(``flwr.supercore.differential_privacy``: the arithmetic of its ``fixedclipping_mod`` and of
its server-side clipping wrapper) applied to the student's tensors.
"""

from __future__ import annotations

import numpy as np
import torch

from moma_protocol.flwr_compat import compute_clip_model_update, get_norm

#: an update that a site clipped to C may measure slightly above it at the coordinator (float32
#: rounding of start + change); beyond this it was not clipped
NORM_SLACK = 1e-3


def update_norm(update: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """L2 norm of ``update − start`` over the update's tensors, as one vector (Flower's)."""
    return get_norm([(update[k].double() - start[k].double()).numpy() for k in update])


def clip_update(update: dict[str, torch.Tensor], start: dict[str, torch.Tensor],
                clipping_norm: float) -> dict[str, torch.Tensor]:
    """``start`` plus the change ``update − start`` scaled down to L2 norm ``clipping_norm``
    (not scaled up): Flower's ``compute_clip_model_update``, what its ``fixedclipping_mod``
    does at a client. An unchanged student (norm 0, which Flower's clipping would divide by)
    is returned as it is."""
    keys = list(update)
    new = [update[k].detach().cpu().numpy().astype(np.float32, copy=True) for k in keys]
    old = [start[k].detach().cpu().numpy().astype(np.float32) for k in keys]
    if update_norm(update, start) > 0:
        compute_clip_model_update(new, old, clipping_norm)
    return {k: torch.from_numpy(v) for k, v in zip(keys, new, strict=True)}
