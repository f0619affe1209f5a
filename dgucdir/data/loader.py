"""The product's training and evaluation images: DALI decodes (nvJPEG on a GPU) and augments.

:class:`MultiDomainLoader` is :class:`.batches.TrainingBatches` fed by DALI pipelines: one per
training domain (two MoCo v2 views per sample, plus the raw resize for a partner bank), and one
more for per-view raw partners. Everything after the decode (order, partners, the Fourier stage)
is the base class's, shared with any other image source.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..config import Config
from .pipeline import READER_NAME, eval_pipeline, partner_pipeline, train_pipeline  # DALI first: its error
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy  # noqa: E402 (after the guarded import)
from .batches import DomainViews, EpochReader, RawPartners, TrainingBatches
from .manifest import Domain, Manifest
from .reader import IndexedSource
from .spec import PipelineSpec


def dali_to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """A DALI TensorList (uniform shape) as a torch tensor on ``device`` (copied: DALI reuses its buffers)."""
    t = torch.from_dlpack(tensor_list.as_tensor())
    return t.to(device, copy=True) if t.device != device else t.clone()


def _ids(tensor_list) -> torch.Tensor:
    """A DALI output of per-sample scalars as an int64 (n,) CPU tensor (ids stay on the CPU, as the draws do)."""
    return dali_to_torch(tensor_list, torch.device("cpu")).view(-1).long()


class _DaliEpoch(EpochReader):
    def __init__(self, pipes: list, partner_pipes: list, with_raw: bool, device: torch.device) -> None:
        self.pipes, self.partner_pipes, self.with_raw, self.device = pipes, partner_pipes, with_raw, device

    def read(self) -> tuple[list[DomainViews], RawPartners | None]:
        views = []
        for p in self.pipes:
            out = p.run()
            views.append(DomainViews(dali_to_torch(out[0], self.device), dali_to_torch(out[1], self.device),
                                     _ids(out[2]).to(self.device), _ids(out[3]).to(self.device),
                                     dali_to_torch(out[4], self.device) if self.with_raw else None))
        partners = None
        for p in self.partner_pipes:
            images, domain, index = p.run()
            partners = RawPartners(dali_to_torch(images, self.device), _ids(domain), _ids(index))
        return views, partners

    def skip(self, steps: int) -> None:
        for _ in range(steps):  # run, without copying out what is dropped
            for p in self.pipes + self.partner_pipes:
                p.run()

    def close(self) -> None:
        self.pipes.clear()
        self.partner_pipes.clear()


class MultiDomainLoader(TrainingBatches):
    """Training batches decoded by DALI: on ``spec``'s GPU (nvJPEG, GPU augmentations) or on the CPU."""

    def __init__(self, cfg: Config, manifest: Manifest, rank_batch: int, spec: PipelineSpec,
                 device: torch.device) -> None:
        super().__init__(cfg, manifest, rank_batch, spec.image_size, spec.shard_id, spec.num_shards, device)
        self.spec = spec

    def open_epoch(self, epoch: int) -> EpochReader:
        pipes = []
        for d, domain in enumerate(self.domains):
            source = None
            if self.global_order:
                order = self.epoch_order(epoch, d)
                source = IndexedSource(self.reader, [d] * len(order), order.tolist(), self.per_domain,
                                       ("encoded", "label", "index"))
            pipes.append(train_pipeline(domain, self.spec, self.per_domain, self.decoder_seed(epoch, domain.name),
                                        min(self.shuffle_buffer, domain.count), self.crop_scale_min, source,
                                        with_raw=self.bank is not None))
        partner_pipes = []
        if self.reads_partners:
            domain, index = self.partner_draws(epoch)
            source = IndexedSource(self.reader, domain.tolist(), index.tolist(),
                                   2 * self.per_domain * len(self.domains), ("encoded", "index", "domain"))
            partner_pipes.append(partner_pipeline(source, self.spec, self.decoder_seed(epoch, "partner")))
        return _DaliEpoch(pipes, partner_pipes, self.bank is not None, self.device)

    def raw_images(self, domain: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        batch = min(len(index), 256)
        pad = -len(index) % batch  # whole batches for the external source; the padding is dropped
        source = IndexedSource(self.reader, torch.cat([domain, domain[-1:].repeat(pad)]).tolist(),
                               torch.cat([index, index[-1:].repeat(pad)]).tolist(), batch,
                               ("encoded", "index", "domain"))
        pipe = partner_pipeline(source, self.spec, 0)
        images = torch.cat([dali_to_torch(pipe.run()[0], self.device) for _ in range(len(source.samples) // batch)])
        return images[:len(index)]


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
