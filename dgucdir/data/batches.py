"""Domain-balanced training batches, Fourier-augmented on the training device, from any image source.

What a step's batch is does not depend on how its images were decoded: this module holds the
reading order, the partner draws, the partner bank and the Fourier stage, and imports no DALI.
:class:`dgucdir.data.loader.MultiDomainLoader` decodes with DALI (the product path); a bare
PyTorch node's device check (``scripts/device_check.py``) decodes with torchvision instead and
runs the same Fourier stage, bank and trainer on the GPU.

Determinism is by construction rather than by saved state: an epoch's decoders are seeded from
(seed, epoch, rank, domain), and every per-step random draw of the Fourier stage (partner
permutation, lambdas) from (seed, epoch, rank, step). Resuming at step s of an epoch therefore
needs no decoder checkpoint: the epoch is reopened and s steps are read and dropped, which
reproduces the uninterrupted run exactly (at the cost of reading at most one epoch's data again).

Reading order (``data.order``):
- ``global`` (default, as the original's ``DistributedSampler``): every epoch a fresh permutation of
  each domain, split across ranks (:mod:`.order`); samples are read by index (:mod:`.reader`).
- ``shard``: each rank reads its fixed contiguous shard of every domain, shuffled in a buffer of
  ``data.shuffle_buffer`` samples around the order fixed at pack time (DALI only; kept for comparison).

Fourier partners (``augment.partner``):
- ``per_view_raw`` (default, the original's exact distribution): every view gets its *own* partner,
  a raw training image (decoded, resized to the training size, no augmentation) drawn uniformly with
  replacement from all training images of all training domains, as the original's
  ``random.randint``; a rank reads them by index (two more decodes per sample).
- ``bank``: the same kind of partner, drawn from a bank of the raw images this rank has already
  decoded (:mod:`.partner_bank`): no decode of its own.
- ``shared_batch`` (kept for the ablation): both views of a sample share one partner, another
  sample's MoCo-augmented view from the same rank's batch.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

import torch

from ..config import Config
from ..seeding import derive_seed
from .fourier import FourierAugment, normalize
from .manifest import Domain, Manifest
from .order import cycled, rank_share
from .partner_bank import PartnerBank
from .reader import SampleReader


@dataclass
class Batch:
    """One training step's inputs for this rank. Views are normalised float (B,3,H,W)."""

    q_phase: torch.Tensor
    k_phase: torch.Tensor
    q_rgb: torch.Tensor
    k_rgb: torch.Tensor
    domain: torch.Tensor
    index: torch.Tensor
    label: torch.Tensor  # for diagnostics only; never used by a loss
    # Which raw image each view was mixed with, (2B,): query views first, then key views; domain -1
    # where there was no raw partner. For tests and diagnostics; never used by a loss.
    partner_domain: torch.Tensor | None = None
    partner_index: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.q_rgb.shape[0]


@dataclass
class DomainViews:
    """One training domain's share of a step, as decoded: uint8 (k,3,S,S) views on the training device."""

    view1: torch.Tensor
    view2: torch.Tensor
    label: torch.Tensor  # (k,) int64
    index: torch.Tensor  # (k,) int64, the sample's index within its domain
    raw: torch.Tensor | None = None  # the samples' raw resizes, for the partner bank


@dataclass
class RawPartners:
    """The step's per-view raw partners (``per_view_raw``): images on the device, their ids on the CPU."""

    images: torch.Tensor
    domain: torch.Tensor
    index: torch.Tensor


class EpochReader(ABC):
    """One epoch's decoded images for this rank, a step at a time."""

    @abstractmethod
    def read(self) -> tuple[list[DomainViews], RawPartners | None]:
        """The next step's views per training domain, and its raw partners when they are read per view."""

    def skip(self, steps: int) -> None:
        """Drops ``steps`` steps (exact resume): by default they are read and discarded."""
        for _ in range(steps):
            self.read()

    def close(self) -> None:
        """Frees the decoders (default: nothing to free)."""


def concurrent_pipelines(cfg: Config) -> int:
    """How many training decoders run at once (one per training domain, one more for per-view raw
    partners): the thread budget's log line reports it, so the total of decoder threads can be read off."""
    return len(cfg.data.train_domains) + int(cfg.augment.fourier and cfg.augment.partner == "per_view_raw")


class TrainingBatches(ABC):
    """Yields :class:`Batch` with exactly batch/n_domains samples per training domain per rank.

    One epoch is one pass over this rank's share of the largest domain; smaller domains wrap
    around, as in the original code. Subclasses decode (:meth:`open_epoch`, :meth:`raw_images`);
    this class decides what is read, which partners are mixed in, and how.
    """

    def __init__(self, cfg: Config, manifest: Manifest, rank_batch: int, image_size: int, rank: int, world: int,
                 device: torch.device) -> None:
        """``rank_batch`` comes from :func:`dgucdir.runtime.validate_runtime`, which checked that it splits."""
        self.domains: list[Domain] = [manifest.domain(d) for d in cfg.data.train_domains]
        self.per_domain = rank_batch // len(self.domains)
        self.image_size, self.rank, self.world = image_size, rank, world
        self.augment = FourierAugment.from_config(cfg.augment)
        self.partner = cfg.augment.partner if cfg.augment.fourier else None  # None: no Fourier mixing
        self.global_order = cfg.data.order == "global"
        self.bank = PartnerBank([d.count for d in self.domains], cfg.augment.partner_bank_size // len(self.domains),
                                image_size, device) if self.partner == "bank" else None
        self.seed = cfg.train.seed
        self.device = device
        self.shuffle_buffer = cfg.data.shuffle_buffer
        self.crop_scale_min = cfg.augment.crop_scale_min
        largest_share = max(math.ceil(d.count / world) for d in self.domains)
        self.steps_per_epoch = math.ceil(largest_share / self.per_domain)
        self.data_wait_s = 0.0  # time spent waiting for decoded images, accumulated; the trainer reads it

    # ------------------------------------------------------------------ what the decoders implement
    @abstractmethod
    def open_epoch(self, epoch: int) -> EpochReader:
        """This rank's decoders for ``epoch``: :meth:`epoch_order` per domain (global order), views with their
        raw resize when there is a bank, and :meth:`partner_draws` decoded raw when partners are per view."""

    @abstractmethod
    def raw_images(self, domain: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The raw resizes (uint8 (n,3,S,S) on the device) of the given samples: a resumed bank's content."""

    # ------------------------------------------------------------------ what is read
    @cached_property
    def reader(self) -> SampleReader:
        """Random access to the training samples (global order, raw partners, a bank's restore)."""
        return SampleReader(self.domains)

    def epoch_order(self, epoch: int, d: int) -> torch.Tensor:
        """The sample indices of the ``d``-th training domain this rank reads in ``epoch``, in order."""
        domain = self.domains[d]
        return cycled(rank_share(domain.count, epoch, self.seed, domain.name, self.rank, self.world),
                      self.steps_per_epoch * self.per_domain)

    def decoder_seed(self, epoch: int, what: str) -> int:
        """The seed of this rank's decoder ``what`` (a domain's name, or "partner") in ``epoch``."""
        return derive_seed(self.seed, epoch, self.rank, what)

    def partner_draws(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(domain, index) of this epoch's raw partners, 2 per sample and step, uniform over all training images."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.rank, "partners"))
        ends = torch.tensor([d.count for d in self.domains]).cumsum(0)
        flat = torch.randint(int(ends[-1]), (self.steps_per_epoch * 2 * self.per_domain * len(self.domains),),
                             generator=generator)
        domain = torch.searchsorted(ends, flat, right=True)
        starts = torch.cat([ends.new_zeros(1), ends[:-1]])
        return domain, flat - starts[domain]

    @property
    def reads_partners(self) -> bool:
        return self.partner == "per_view_raw"

    # ------------------------------------------------------------------ batches
    def epoch(self, epoch: int, start_step: int = 0, num_steps: int | None = None) -> Iterator[Batch]:
        """Batches of ``epoch`` from ``start_step`` (exact resume) to ``num_steps`` (default: all)."""
        if self.bank is not None and self.bank.needs_restore:
            self._restore_bank()
        reader = self.open_epoch(epoch)
        try:
            reader.skip(start_step)
            for step in range(start_step, num_steps if num_steps is not None else self.steps_per_epoch):
                t0 = time.perf_counter()
                views, partners = reader.read()
                self.data_wait_s += time.perf_counter() - t0
                yield self.fourier_batch(views, partners, epoch, step)
        finally:
            reader.close()

    def _restore_bank(self) -> None:
        """Decodes the samples a checkpoint's bank held back into their slots (exact resume)."""
        domain, slot, index = self.bank.occupied()
        if len(index):
            self.bank.restore(domain, slot, self.raw_images(domain, index))
        self.bank.needs_restore = False

    def fourier_batch(self, views: list[DomainViews], partners: RawPartners | None, epoch: int, step: int) -> Batch:
        """The step's :class:`Batch`: views mixed with their partners, phase images, normalisation."""
        if self.bank is not None:
            for d, v in enumerate(views):
                self.bank.add(d, v.raw, v.index)
        x1, x2 = torch.cat([v.view1 for v in views]), torch.cat([v.view2 for v in views])
        gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.rank, step, "fourier"))
        q_rgb, k_rgb = x1.float(), x2.float()
        partner_domain = partner_index = torch.full((2 * len(x1),), -1)
        if self.partner in ("bank", "per_view_raw"):
            if self.bank is not None:
                partner_domain, slot = self.bank.draw(2 * len(x1), gen)
                images, partner_index = self.bank.gather(partner_domain, slot), self.bank.ids[partner_domain, slot]
            else:
                images, partner_domain, partner_index = partners.images, partners.domain, partners.index
            q_rgb = self.augment.mix(x1, images[: len(x1)], *self.augment.sample_lambdas(len(x1), gen))
            k_rgb = self.augment.mix(x2, images[len(x1):], *self.augment.sample_lambdas(len(x2), gen))
        elif self.partner == "shared_batch":
            partner = random_derangement(len(x1), gen).to(self.device)
            q_rgb = self.augment.mix_with_partner(x1, partner, *self.augment.sample_lambdas(len(x1), gen))
            k_rgb = self.augment.mix_with_partner(x2, partner, *self.augment.sample_lambdas(len(x2), gen))
        q_phase, k_phase = self.augment.phase_image(x1), self.augment.phase_image(x2)
        domain = torch.cat([torch.full_like(v.index, d) for d, v in enumerate(views)])
        return Batch(normalize(q_phase), normalize(k_phase), normalize(q_rgb), normalize(k_rgb), domain,
                     torch.cat([v.index for v in views]), torch.cat([v.label for v in views]),
                     partner_domain, partner_index)


def random_derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation without fixed points (n >= 2): a random cycle through all items."""
    if n < 2:
        return torch.zeros(n, dtype=torch.long)
    order = torch.randperm(n, generator=generator)
    partner = torch.empty(n, dtype=torch.long)
    partner[order] = order.roll(-1)
    return partner
