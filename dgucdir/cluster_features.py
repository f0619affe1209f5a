"""What the cluster loss clusters: pooled features of the training images' colour phase images.

One function shared by the trainer (every epoch after the warm-up) and by
``scripts/kmeans_compare.py``, which measures the two k-means variants on the same features.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import dist
from .config import Config
from .data.fourier import FourierAugment, normalize
from .data.manifest import Manifest
from .data.spec import ImageSource
from .retrieval import embed_local


@torch.no_grad()
def training_features(encoder: torch.nn.Module, cfg: Config, manifest: Manifest, source: ImageSource,
                      device: torch.device, precision: str = "no", checkpoint: Callable[[], None] = lambda: None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's shard of every training domain: (features, labels, domain positions, indices).

    Colour phase images (per-channel phase with constant amplitude), as the original clusters;
    plain RGB for ``model.rgb_only``. The encoder embeds in eval mode with the statistics every
    rank shares, and is put back in the mode it was in. ``checkpoint()`` runs on every rank after each
    domain (the trainer's stop check, which may raise).
    """
    dist.broadcast_buffers(encoder)  # every rank embeds with the model a checkpoint holds
    was_training = encoder.training
    encoder.eval()
    augment = FourierAugment.from_config(cfg.augment)
    transform = None if cfg.model.rgb_only else (lambda x: normalize(augment.color_phase_image(x)))
    feats, labels, domains, indices = [], [], [], []
    try:
        for d, name in enumerate(cfg.data.train_domains):
            f, label, idx = embed_local(encoder, manifest.domain(name), source, cfg.eval.batch_size, device,
                                        transform, precision)
            feats.append(f)
            labels.append(label)
            indices.append(idx)
            domains.append(torch.full_like(idx, d))
            checkpoint()
    finally:
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels), torch.cat(domains), torch.cat(indices)
