"""ResNet backbone with the MoCo v2 MLP head, returning both embeddings the method needs.

The module *is* a torchvision ResNet whose ``fc`` is the MLP head (``fc.0``/``fc.2``), so a
MoCo v2 checkpoint's ``module.encoder_q.*`` keys load without renaming.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet, resnet18, resnet50

from ..checkpoint import safe_load
from ..errors import CheckpointError

log = logging.getLogger(__name__)

MOCO_PREFIX = "module.encoder_q."


def narrow_resnet(width: int = 32) -> ResNet:
    """A ResNet-10 with a quarter of ResNet-18's width: the demo's CPU-sized backbone."""
    net = ResNet(BasicBlock, [1, 1, 1, 1])
    net.inplanes = width
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    net.layer1 = net._make_layer(BasicBlock, width, 1)
    net.layer2 = net._make_layer(BasicBlock, 2 * width, 1, stride=2)
    net.layer3 = net._make_layer(BasicBlock, 4 * width, 1, stride=2)
    net.layer4 = net._make_layer(BasicBlock, 8 * width, 1, stride=2)
    net.fc = nn.Linear(8 * width, 1000)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


BACKBONES = {"resnet50": resnet50, "resnet18": resnet18, "resnet_narrow": narrow_resnet}


class Encoder(nn.Module):
    """x -> (L2-normalised projection, L2-normalised globally pooled feature)."""

    def __init__(self, arch: str = "resnet50", proj_dim: int = 128) -> None:
        super().__init__()
        if arch not in BACKBONES:
            raise ValueError(f"model.arch: unknown {arch!r}; allowed: {', '.join(BACKBONES)}")
        net = BACKBONES[arch]()
        self.feature_dim = net.fc.in_features
        net.fc = nn.Sequential(nn.Linear(self.feature_dim, self.feature_dim), nn.ReLU(inplace=True),
                               nn.Linear(self.feature_dim, proj_dim))
        self.net = net

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The un-normalised globally pooled backbone feature."""
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        return torch.flatten(n.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.pooled(x)
        return F.normalize(self.net.fc(h), dim=1), F.normalize(h, dim=1)


def load_moco_v2(encoder: Encoder, path: str | Path) -> tuple[list[str], list[str]]:
    """Loads a MoCo v2 checkpoint (``state_dict`` with ``module.encoder_q.*``) into ``encoder``.

    Returns (missing, unexpected) keys, which are also logged. A file that is not such a
    checkpoint, or whose tensors do not fit this architecture, is a clear error.
    """
    path = Path(path)
    ckpt = safe_load(path)
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not any(k.startswith(MOCO_PREFIX) for k in state):
        raise CheckpointError(f"{path}: not a MoCo v2 checkpoint (expected a 'state_dict' with '{MOCO_PREFIX}*' keys)")
    weights = {k[len(MOCO_PREFIX):]: v for k, v in state.items() if k.startswith(MOCO_PREFIX)}
    own = encoder.net.state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in weights.items()
           if k in own and own[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{path}: tensors do not fit this architecture: " + "; ".join(bad[:5]))
    result = encoder.net.load_state_dict(weights, strict=False)
    if result.missing_keys:
        log.warning("MoCo v2 init from %s: missing keys %s", path, result.missing_keys)
    if result.unexpected_keys:
        log.warning("MoCo v2 init from %s: unexpected keys %s", path, result.unexpected_keys)
    log.info("MoCo v2 init from %s: %d tensors loaded", path, len(weights) - len(result.unexpected_keys))
    return result.missing_keys, result.unexpected_keys
