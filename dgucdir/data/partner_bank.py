"""A bank of raw training images on the training device: Fourier partners that cost no decode of their own.

The original gives every view its own partner, a raw (decoded, resized, un-augmented) training
image drawn uniformly from all training domains, which costs two more reads and decodes per
sample (``augment.partner=per_view_raw``). The bank gets the same kind of partner from images
this rank decodes anyway: the training pipeline emits, beside the two augmented views, each
sample's raw resize (one more resize of an image already decoded), which goes into a ring buffer
per training domain. Each view then draws its partner from the bank:

- the partner's domain with probability proportional to the domain's size, as a uniform draw over
  all training images makes it (the batches themselves are domain-balanced);
- then one of that domain's filled slots, uniformly.

How the bank covers the training set: under ``data.order=global`` a rank reads a fresh random
1/W share of every domain each epoch, so its bank is a uniform random sample of the training
images, renewed every ``slots_per_domain / per-domain batch`` steps; over epochs every image passes
through every rank's bank. When a domain has no more images than its slots, the bank holds every
image the rank has read (after an epoch with one rank: all of them). The step's own images are in
the bank before the draw, so a view can draw its own raw image, with probability 1 in the slots
filled (the original: 1 in the training set's size).

Exact resume without saving pixels: the checkpoint keeps the sample index in every slot and the
write positions (:meth:`state_dict`); a resumed run decodes those samples again into the same
slots (:meth:`restore`), with the same resize, so the bank equals the uninterrupted run's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class PartnerBank:
    def __init__(self, domain_sizes: Sequence[int], slots_per_domain: int, image_size: int,
                 device: torch.device) -> None:
        if slots_per_domain < 1:
            raise ValueError(f"a partner bank needs at least one slot per domain, got {slots_per_domain}")
        n = len(domain_sizes)
        self.domain_sizes = torch.tensor(list(domain_sizes), dtype=torch.float64)
        self.slots = slots_per_domain
        self.images = torch.zeros((n, slots_per_domain, 3, image_size, image_size), dtype=torch.uint8, device=device)
        self.ids = torch.full((n, slots_per_domain), -1, dtype=torch.long)  # sample index in each slot; -1: empty
        self.written = torch.zeros(n, dtype=torch.long)  # images written per domain, ever (the ring's cursor)
        self.needs_restore = False  # ids loaded from a checkpoint, pixels not decoded yet

    def memory_bytes(self) -> int:
        return self.images.numel()

    def filled(self) -> torch.Tensor:
        return self.written.clamp(max=self.slots)

    def add(self, domain: int, images: torch.Tensor, indices: torch.Tensor) -> None:
        """Writes one domain's raw images of a step (uint8 (k,3,S,S) and their sample indices) into its ring."""
        if len(indices) > self.slots:  # only the last `slots` would survive; writing them all races on slots
            images, indices = images[-self.slots:], indices[-self.slots:]
        slot = (self.written[domain] + torch.arange(len(indices))) % self.slots
        self.images[domain, slot.to(self.images.device)] = images.to(self.images.device)
        self.ids[domain, slot] = indices.cpu().long()
        self.written[domain] += len(indices)

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(domain, slot) of ``n`` partners: domain by size among those with images, then a filled slot uniformly."""
        filled = self.filled()
        weights = self.domain_sizes * (filled > 0)
        if not weights.any():
            raise RuntimeError("the partner bank is empty: add a step's images before drawing partners")
        domain = torch.multinomial(weights, n, replacement=True, generator=generator)
        slot = (torch.rand(n, generator=generator, dtype=torch.float64) * filled[domain]).long()
        return domain, slot

    def gather(self, domain: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """The partners' images, uint8 (n,3,S,S) on the bank's device."""
        device = self.images.device
        return self.images[domain.to(device), slot.to(device)]

    def state_dict(self) -> dict:
        return {"ids": self.ids.clone(), "written": self.written.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["ids"].shape != self.ids.shape:
            raise ValueError(f"the checkpoint's partner bank has {tuple(state['ids'].shape)} (domains, slots); this "
                             f"run's has {tuple(self.ids.shape)}: keep augment.partner_bank_size and the domains "
                             "to resume")
        self.ids, self.written = state["ids"].clone(), state["written"].clone()
        self.needs_restore = True

    def occupied(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(domain, slot, sample index) of every filled slot: what :meth:`restore` needs decoded."""
        domain, slot = (self.ids >= 0).nonzero(as_tuple=True)
        return domain, slot, self.ids[domain, slot]

    def restore(self, domain: torch.Tensor, slot: torch.Tensor, images: torch.Tensor) -> None:
        """Puts the decoded raw images of :meth:`occupied` back into their slots."""
        self.images[domain.to(self.images.device), slot.to(self.images.device)] = images.to(self.images.device)
