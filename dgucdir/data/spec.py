"""Where a rank's images come from: the :class:`ImageSource` interface and its DALI implementation's spec.

The trainer, clustering and evaluation ask an image source for training batches and for one
domain's evaluation images; they never import DALI. :class:`PipelineSpec` is the product's
source (DALI pipelines, built only when asked for, so a node without DALI imports everything
else and gets one line naming the extra to install when it does ask). A bare PyTorch node's
device check brings its own source with the same two methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Protocol

import torch

if TYPE_CHECKING:
    from ..config import Config
    from .batches import TrainingBatches
    from .manifest import Domain, Manifest

EvalBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # uint8 (n,3,S,S) images, labels, indices in the domain


class ImageSource(Protocol):
    """What the trainer and evaluation need of a decoder."""

    image_size: int

    def training_batches(self, cfg: "Config", manifest: "Manifest", rank_batch: int,
                         device: torch.device) -> "TrainingBatches":
        """This rank's domain-balanced, Fourier-augmented training batches."""

    def eval_batches(self, domain: "Domain", batch_size: int, device: torch.device) -> Iterator[EvalBatch]:
        """This rank's share of ``domain`` exactly once (resized, centre-cropped, uint8)."""


@dataclass(frozen=True)
class PipelineSpec:
    """The DALI image source of a rank: what every pipeline of the rank shares."""

    image_size: int
    shard_id: int
    num_shards: int
    device_id: int | None  # None: CPU-only pipeline
    num_threads: int = 2

    @property
    def on_gpu(self) -> bool:
        return self.device_id is not None

    @classmethod
    def for_device(cls, image_size: int, num_threads: int, device: torch.device, rank: int = 0, world: int = 1
                   ) -> "PipelineSpec":
        """This rank's spec: DALI decodes on ``device``'s GPU when it is one, on the CPU otherwise."""
        device_id = (device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else None
        return cls(image_size, rank, world, device_id, num_threads)

    def training_batches(self, cfg: "Config", manifest: "Manifest", rank_batch: int,
                         device: torch.device) -> "TrainingBatches":
        from .loader import MultiDomainLoader

        return MultiDomainLoader(cfg, manifest, rank_batch, self, device)

    def eval_batches(self, domain: "Domain", batch_size: int, device: torch.device) -> Iterator[EvalBatch]:
        from .loader import eval_batches

        return eval_batches(domain, self, batch_size, device)
