"""Domain-balanced training batches from DALI, Fourier-augmented on the training device.

Determinism is by construction rather than by saved state: an epoch's DALI pipelines are
built with seeds derived from (seed, epoch, rank, domain), and every per-step random draw of
the Fourier stage (partner permutation, lambdas) from (seed, epoch, rank, step). Resuming at
step s of an epoch therefore needs no DALI checkpoint: the pipelines are rebuilt and s batches
are read and dropped, which reproduces the uninterrupted run exactly (at the cost of reading
at most one epoch's data again).

Reading order (``data.order``):
- ``global`` (default, as the original's ``DistributedSampler``): every epoch a fresh permutation of
  each domain, split across ranks (:mod:`.order`); samples are read by index (:mod:`.reader`).
- ``shard``: each rank reads its fixed contiguous shard of every domain, shuffled in a buffer of
  ``data.shuffle_buffer`` samples around the order fixed at pack time (kept for comparison).

Fourier partners (``augment.partner``):
- ``per_view_raw`` (default, the original's exact distribution): every view gets its *own* partner,
  a raw training image (decoded, resized to the training size, no augmentation) drawn uniformly with
  replacement from all training images of all training domains, as the original's
  ``random.randint``; a rank reads them by index through one extra DALI pipeline (two more decodes
  per sample).
- ``bank``: the same kind of partner, drawn from a bank of the raw images this rank's training
  pipeline has already decoded (:mod:`.partner_bank`): no decode of its own.
- ``shared_batch`` (kept for the ablation): both views of a sample share one partner, another
  sample's MoCo-augmented view from the same rank's batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

import torch
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from ..config import Config
from ..seeding import derive_seed
from .fourier import FourierAugment, normalize
from .manifest import Domain, Manifest
from .order import cycled, rank_share
from .partner_bank import PartnerBank
from .pipeline import READER_NAME, PipelineSpec, eval_pipeline, partner_pipeline, train_pipeline
from .reader import IndexedSource, SampleReader


def dali_to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """A DALI TensorList (uniform shape) as a torch tensor on ``device`` (copied: DALI reuses its buffers)."""
    t = torch.from_dlpack(tensor_list.as_tensor())
    return t.to(device, copy=True) if t.device != device else t.clone()


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


def concurrent_pipelines(cfg: Config) -> int:
    """How many training DALI pipelines run at once (one per training domain, one more for per-view raw
    partners): the thread budget's log line reports it, so the total of DALI threads can be read off."""
    return len(cfg.data.train_domains) + int(cfg.augment.fourier and cfg.augment.partner == "per_view_raw")


class MultiDomainLoader:
    """Yields :class:`Batch` with exactly batch/n_domains samples per training domain per rank.

    One epoch is one pass over this rank's share of the largest domain; smaller domains wrap
    around, as in the original code.
    """

    def __init__(self, cfg: Config, manifest: Manifest, rank_batch: int, spec: PipelineSpec,
                 device: torch.device) -> None:
        """``rank_batch`` comes from :func:`dgucdir.runtime.validate_runtime`, which checked that it splits."""
        self.domains: list[Domain] = [manifest.domain(d) for d in cfg.data.train_domains]
        self.per_domain = rank_batch // len(self.domains)
        self.spec = spec
        self.augment = FourierAugment.from_config(cfg.augment)
        self.partner = cfg.augment.partner if cfg.augment.fourier else None  # None: no Fourier mixing
        self.global_order = cfg.data.order == "global"
        self.bank = PartnerBank([d.count for d in self.domains], cfg.augment.partner_bank_size // len(self.domains),
                                spec.image_size, device) if self.partner == "bank" else None
        self.seed = cfg.train.seed
        self.device = device
        self.shuffle_buffer = cfg.data.shuffle_buffer
        self.crop_scale_min = cfg.augment.crop_scale_min
        largest_share = max(math.ceil(d.count / spec.num_shards) for d in self.domains)
        self.steps_per_epoch = math.ceil(largest_share / self.per_domain)
        self.data_wait_s = 0.0  # time spent waiting for DALI, accumulated; the trainer reads it

    @cached_property
    def reader(self) -> SampleReader:
        """Random access to the training samples (global order, raw partners, a bank's restore)."""
        return SampleReader(self.domains)

    def _pipelines(self, epoch: int) -> list:
        pipes = []
        rank, world = self.spec.shard_id, self.spec.num_shards
        for d, domain in enumerate(self.domains):
            source = None
            if self.global_order:
                order = cycled(rank_share(domain.count, epoch, self.seed, domain.name, rank, world),
                               self.steps_per_epoch * self.per_domain)
                source = IndexedSource(self.reader, [d] * len(order), order.tolist(), self.per_domain,
                                       ("encoded", "label", "index"))
            seed = derive_seed(self.seed, epoch, rank, domain.name)
            pipes.append(train_pipeline(domain, self.spec, self.per_domain, seed, min(self.shuffle_buffer, domain.count),
                                        self.crop_scale_min, source, with_raw=self.bank is not None))
        return pipes

    def partner_draws(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(domain, index) of this epoch's raw partners, 2 per sample and step, uniform over all training images."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.spec.shard_id, "partners"))
        ends = torch.tensor([d.count for d in self.domains]).cumsum(0)
        flat = torch.randint(int(ends[-1]), (self.steps_per_epoch * 2 * self.per_domain * len(self.domains),),
                             generator=generator)
        domain = torch.searchsorted(ends, flat, right=True)
        starts = torch.cat([ends.new_zeros(1), ends[:-1]])
        return domain, flat - starts[domain]

    def _partner_pipelines(self, epoch: int) -> list:
        if self.partner != "per_view_raw":
            return []
        domain, index = self.partner_draws(epoch)
        source = IndexedSource(self.reader, domain.tolist(), index.tolist(), 2 * self.per_domain * len(self.domains),
                               ("encoded", "index", "domain"))
        return [partner_pipeline(source, self.spec, derive_seed(self.seed, epoch, self.spec.shard_id, "partner"))]

    def epoch(self, epoch: int, start_step: int = 0, num_steps: int | None = None) -> Iterator[Batch]:
        """Batches of ``epoch`` from ``start_step`` (exact resume) to ``num_steps`` (default: all)."""
        if self.bank is not None and self.bank.needs_restore:
            self._restore_bank()
        pipes, partner_pipes = self._pipelines(epoch), self._partner_pipelines(epoch)
        try:
            for _ in range(start_step):
                for p in pipes + partner_pipes:
                    p.run()
            for step in range(start_step, num_steps if num_steps is not None else self.steps_per_epoch):
                yield self._batch(pipes, partner_pipes, epoch, step)
        finally:
            del pipes, partner_pipes

    def _restore_bank(self) -> None:
        """Decodes the samples a checkpoint's bank held back into their slots (exact resume)."""
        domain, slot, index = self.bank.occupied()
        if len(index):
            batch = min(len(index), 256)
            pad = -len(index) % batch  # whole batches for the external source; the padding is dropped
            source = IndexedSource(self.reader, torch.cat([domain, domain[-1:].repeat(pad)]).tolist(),
                                   torch.cat([index, index[-1:].repeat(pad)]).tolist(), batch,
                                   ("encoded", "index", "domain"))
            pipe = partner_pipeline(source, self.spec, 0)
            images = torch.cat([dali_to_torch(pipe.run()[0], self.device) for _ in range(len(source.samples) // batch)])
            self.bank.restore(domain, slot, images[:len(index)])
        self.bank.needs_restore = False

    def _batch(self, pipes: list, partner_pipes: list, epoch: int, step: int) -> Batch:
        t0 = time.perf_counter()
        v1, v2, label, index, domain = [], [], [], [], []
        for d, p in enumerate(pipes):
            out = p.run()
            v1.append(dali_to_torch(out[0], self.device))
            v2.append(dali_to_torch(out[1], self.device))
            label.append(dali_to_torch(out[2], self.device).view(-1).long())
            index.append(dali_to_torch(out[3], self.device).view(-1).long())
            domain.append(torch.full_like(index[-1], d))
            if self.bank is not None:
                self.bank.add(d, dali_to_torch(out[4], self.device), index[-1])
        raw = [p.run() for p in partner_pipes]
        self.data_wait_s += time.perf_counter() - t0
        x1, x2 = torch.cat(v1), torch.cat(v2)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.spec.shard_id, step, "fourier"))
        q_rgb, k_rgb = x1.float(), x2.float()
        partner_domain = partner_index = torch.full((2 * len(x1),), -1)
        if self.partner in ("bank", "per_view_raw"):
            if self.bank is not None:
                partner_domain, slot = self.bank.draw(2 * len(x1), gen)
                partners, partner_index = self.bank.gather(partner_domain, slot), self.bank.ids[partner_domain, slot]
            else:
                (images, partner_domain, partner_index), = raw
                partners = dali_to_torch(images, self.device)
                partner_domain = dali_to_torch(partner_domain, torch.device("cpu")).view(-1).long()
                partner_index = dali_to_torch(partner_index, torch.device("cpu")).view(-1).long()
            q_rgb = self.augment.mix(x1, partners[: len(x1)], *self.augment.sample_lambdas(len(x1), gen))
            k_rgb = self.augment.mix(x2, partners[len(x1):], *self.augment.sample_lambdas(len(x2), gen))
        elif self.partner == "shared_batch":
            partner = random_derangement(len(x1), gen).to(self.device)
            q_rgb = self.augment.mix_with_partner(x1, partner, *self.augment.sample_lambdas(len(x1), gen))
            k_rgb = self.augment.mix_with_partner(x2, partner, *self.augment.sample_lambdas(len(x2), gen))
        q_phase, k_phase = self.augment.phase_image(x1), self.augment.phase_image(x2)
        return Batch(normalize(q_phase), normalize(k_phase), normalize(q_rgb), normalize(k_rgb),
                     torch.cat(domain), torch.cat(index), torch.cat(label), partner_domain, partner_index)


def random_derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation without fixed points (n >= 2): a random cycle through all items."""
    if n < 2:
        return torch.zeros(n, dtype=torch.long)
    order = torch.randperm(n, generator=generator)
    partner = torch.empty(n, dtype=torch.long)
    partner[order] = order.roll(-1)
    return partner


def eval_batches(domain: Domain, spec: PipelineSpec, batch_size: int, device: torch.device
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """This rank's share of ``domain`` exactly once, in shard order: (uint8 images, labels, indices).

    The reader pads the last batch so that all ranks step together; the iterator's PARTIAL
    policy drops the padding again, so no sample is seen twice.
    """
    pipe = eval_pipeline(domain, spec, batch_size)
    it = DALIGenericIterator([pipe], ["image", "label", "index"], reader_name=READER_NAME,
                             last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)
    for out in it:
        b = out[0]
        yield b["image"].to(device), b["label"].view(-1).long().to(device), b["index"].view(-1).long().to(device)
