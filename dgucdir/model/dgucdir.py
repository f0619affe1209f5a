"""The DG-UCDIR module: query/key encoders, momentum update, BatchNorm modes, the five losses.

Shaped after MoCo's builder: each mechanism is one short method. ``forward`` returns named
losses and accuracies (no positional slicing of concatenated logits) and enqueues the new
keys after the loss. The original also computed 2048-d queue logits that never reached its
loss; that dead work is not reproduced.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from ..cluster import ClusterTargets
from ..config import LossConfig, ModelConfig
from ..data.batches import Batch
from ..seeding import derive_seed
from .batchnorm import set_batchnorm_group, to_global_batchnorm
from .encoder import Encoder
from .queue import ShardedQueue, infonce_terms, sample_ids


class DGUCDIR(nn.Module):
    def __init__(self, model_cfg: ModelConfig, loss_cfg: LossConfig, n_domains: int, rank_batch: int,
                 device: torch.device, seed: int = 0) -> None:
        super().__init__()
        self.model_cfg = model_cfg
        self.loss_cfg = loss_cfg
        self.encoder_q = Encoder(model_cfg.arch, model_cfg.proj_dim)
        if model_cfg.bn == "paper" and dist.world_size() > 1:  # one batch over all ranks, as on one GPU
            to_global_batchnorm(self.encoder_q)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        if model_cfg.bn == "paper" and dist.world_size() > 1:  # after the copy: a process group is not copied
            group = dist.batchnorm_group(model_cfg.bn_group)
            set_batchnorm_group(self.encoder_q, group)
            set_batchnorm_group(self.encoder_k, group)
        self.n_domains = n_domains
        self.seed = seed
        queue_domains = 1 if loss_cfg.shared_queue else n_domains
        per_domain = rank_batch if loss_cfg.shared_queue else rank_batch // n_domains
        self.rgb_queue = ShardedQueue(queue_domains, loss_cfg.queue_size, model_cfg.proj_dim, per_domain, device, seed)
        self.phase_queue = None if model_cfg.rgb_only else ShardedQueue(
            queue_domains, loss_cfg.queue_size, model_cfg.proj_dim, per_domain, device, seed + 1)
        self.step = 0  # drives the shuffle-BN permutation; saved with the training state
        self.shuffle_bn = model_cfg.bn == "shuffle"

    @property
    def feature_dim(self) -> int:
        return self.encoder_q.feature_dim

    @torch.no_grad()
    def momentum_update(self) -> None:
        """key = m * key + (1 - m) * query, parameters only (BN statistics are the key encoder's own)."""
        m = self.model_cfg.momentum
        k_params = list(self.encoder_k.parameters())
        torch._foreach_mul_(k_params, m)
        torch._foreach_add_(k_params, [p.detach() for p in self.encoder_q.parameters()], alpha=1 - m)

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """Key projections of this rank's key views. ``model.bn=paper``: BatchNorm over the whole global
        key batch (one call with one process, global statistics across ranks); ``local``: over this
        rank's keys; ``shuffle``: :meth:`shuffled_keys`."""
        return self.shuffled_keys(x) if self.shuffle_bn else self.encoder_k(x)[0]

    @torch.no_grad()
    def shuffled_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Key projections computed with shuffle-BN, returned in the original order.

        Across ranks: the gathered batch is permuted and each rank embeds its slice, so a key's BN
        statistics come from other samples than its query's. With one process the permuted batch
        is embedded in two halves (BN statistics per half), the single-GPU stand-in MoCo users
        apply: without it the key and query of a sample share batch statistics, which lets the
        model "cheat" the pretext task. The permutation comes from a generator seeded by train.seed and the
        step, identical on every rank: no broadcast, and a resumed run shuffles exactly as before.
        """
        gen = torch.Generator().manual_seed(derive_seed("shuffle-bn", self.seed, self.step))
        n, r = x.shape[0], dist.rank()
        x_all = dist.all_gather(x)
        perm = torch.randperm(x_all.shape[0], generator=gen).to(x.device)
        if dist.is_distributed():
            k_shuffled = dist.all_gather(self.encoder_k(x_all[perm[r * n : (r + 1) * n]])[0])
        else:
            k_shuffled = torch.cat([self.encoder_k(half)[0] for half in x_all[perm].chunk(2)])
        k_all = torch.empty_like(k_shuffled)
        k_all[perm] = k_shuffled
        return k_all[r * n : (r + 1) * n]

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.model_cfg.channels_last else x

    def forward(self, batch: Batch, clusters: ClusterTargets | None = None) -> dict[str, torch.Tensor]:
        cfg = self.loss_cfg
        T = cfg.temperature
        rgb_only = self.model_cfg.rgb_only
        B = len(batch)
        queue_domain = torch.zeros_like(batch.domain) if cfg.shared_queue else batch.domain
        ids = sample_ids(batch.domain, batch.index)

        q_in = batch.q_rgb if rgb_only else torch.cat([batch.q_phase, batch.q_rgb])
        q, pooled = self.encoder_q(self._prep(q_in))
        with torch.no_grad():
            self.momentum_update()
            k_in = batch.k_rgb if rgb_only else torch.cat([batch.k_phase, batch.k_rgb])
            k = self.keys(self._prep(k_in))

        out: dict[str, torch.Tensor] = {}
        if rgb_only:
            q_rgb, k_rgb, k_phase = q, k, None
            terms = {"rgb_rgb": (q_rgb, k_rgb, self.rgb_queue, cfg.w_rgb_rgb)}
        else:
            q_phase, q_rgb = q[:B], q[B:]
            k_phase, k_rgb = k[:B], k[B:]
            by_query = cfg.cross_negatives == "query"
            terms = {
                "phase_phase": (q_phase, k_phase, self.phase_queue, cfg.w_phase_phase),
                "rgb_rgb": (q_rgb, k_rgb, self.rgb_queue, cfg.w_rgb_rgb),
                "phase_rgb": (q_phase, k_rgb, self.phase_queue if by_query else self.rgb_queue, cfg.w_phase_rgb),
                "rgb_phase": (q_rgb, k_phase, self.rgb_queue if by_query else self.phase_queue, cfg.w_rgb_phase),
            }
        if cfg.batch_negatives:
            self._enqueue(k_rgb, k_phase, ids, queue_domain)
        total = q.new_zeros((), dtype=torch.float32)
        results = infonce_terms({name: (query, key, queue) for name, (query, key, queue, _) in terms.items()},
                                queue_domain, ids, T)
        for name, (_, _, _, weight) in terms.items():
            out[f"loss_{name}"] = results[name].loss
            out[f"acc_{name}"] = results[name].accuracy
            total = total + weight * results[name].loss
        if clusters is not None and cfg.cluster:
            targets = clusters.assignments.repeat(pooled.shape[0] // B)
            with torch.autocast(pooled.device.type, enabled=False):  # fp32 under bf16 training too
                logits = pooled.float() @ clusters.centroids.float().T  # no temperature, as the original
            out["loss_cluster"] = F.cross_entropy(logits, targets)
            out["acc_cluster"] = (logits.argmax(1) == targets).float().mean()
            total = total + cfg.cluster_weight * out["loss_cluster"]
        out["loss"] = total

        if not cfg.batch_negatives:
            self._enqueue(k_rgb, k_phase, ids, queue_domain)
        self.step += 1
        return out

    def _enqueue(self, k_rgb: torch.Tensor, k_phase: torch.Tensor | None, ids: torch.Tensor,
                 queue_domain: torch.Tensor) -> None:
        self.rgb_queue.enqueue(k_rgb, ids, queue_domain)
        if self.phase_queue is not None:
            self.phase_queue.enqueue(k_phase, ids, queue_domain)

    def queues_state(self) -> dict:
        state = {"rgb": self.rgb_queue.state_dict(), "step": self.step}
        if self.phase_queue is not None:
            state["phase"] = self.phase_queue.state_dict()
        return state

    def load_queues_state(self, state: dict) -> None:
        self.rgb_queue.load_state_dict(state["rgb"])
        if self.phase_queue is not None:
            self.phase_queue.load_state_dict(state["phase"])
        self.step = state["step"]
