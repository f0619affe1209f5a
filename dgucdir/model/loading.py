"""Where an encoder to evaluate or search with comes from: a training checkpoint, MoCo v2 weights, or a seed.

Kept beside the encoder (not in the generic checkpoint module) because it is the one place
that knows how a DG-UCDIR checkpoint's model state maps onto an :class:`Encoder`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..checkpoint import META, read_shared
from ..config import Config, from_dict, load_config, to_dict, with_overrides
from ..errors import CheckpointError
from .encoder import MOCO_PREFIX, Encoder, load_moco_v2

QUERY_PREFIX = "encoder_q."


def encoder_state(shared: dict) -> dict[str, torch.Tensor]:
    """The query encoder's tensors out of a checkpoint's shared state."""
    return {k[len(QUERY_PREFIX):]: v for k, v in shared["model"].items() if k.startswith(QUERY_PREFIX)}


def encoder_from_checkpoint(path: Path, config: str | Path | None = None,
                            overrides: Sequence[str] = ()) -> tuple[Encoder, Config]:
    """The query encoder of a dgucdir checkpoint (folder or its state.pt), or of an encoder exported by
    ``dgucdir export`` (``.safetensors``, which carries its config), and the config to use it with.

    The config is the one it was trained with, or the file ``config`` when given; ``overrides``
    apply to either and are validated as on the command line (its model section must still
    match the checkpoint's tensors).
    """
    if Path(path).suffix == ".safetensors":
        encoder, saved = load_encoder(Path(path))
        cfg = load_config(config, overrides) if config else with_overrides(to_dict(saved), overrides)
        if (cfg.model.arch, cfg.model.proj_dim) != (saved.model.arch, saved.model.proj_dim):
            raise CheckpointError(f"{path}: holds a {saved.model.arch} encoder; the config asks for {cfg.model.arch}")
        return encoder, cfg
    shared = read_shared(path)
    cfg = load_config(config, overrides) if config else with_overrides(shared[META]["config"], overrides)
    encoder = Encoder(cfg.model.arch, cfg.model.proj_dim)
    try:
        encoder.load_state_dict(encoder_state(shared))
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: was trained with another architecture than model.arch={cfg.model.arch} "
                              f"({str(exc).splitlines()[0]})") from exc
    return encoder, cfg


EXPORT_LAYOUTS = ("dgucdir", "moco_v2")


def save_encoder(encoder: Encoder, cfg: Config, out: Path, layout: str = "dgucdir") -> Path:
    """The encoder's weights and its config in one safetensors file (atomic).

    ``layout="moco_v2"`` names the backbone tensors as a MoCo v2 checkpoint does
    (``module.encoder_q.conv1.weight``, ...), for code that loads MoCo weights.
    """
    from safetensors.torch import save_file

    from ..config import to_yaml

    if layout not in EXPORT_LAYOUTS:
        raise CheckpointError(f"export layout {layout!r}: expected one of {', '.join(EXPORT_LAYOUTS)}")
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    if layout == "moco_v2":
        state = {MOCO_PREFIX + k[len("net."):]: v for k, v in state.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(state, str(tmp), metadata={"dgucdir.config": to_yaml(cfg), "dgucdir.layout": layout})
    tmp.replace(out)
    return out


def load_encoder(path: Path) -> tuple[Encoder, Config]:
    """An encoder saved by :func:`save_encoder` (either layout), with the config it was trained with."""
    import yaml
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    if "dgucdir.config" not in meta:
        raise CheckpointError(f"{path}: not an encoder exported by dgucdir (no config in its metadata)")
    cfg = from_dict(yaml.safe_load(meta["dgucdir.config"]))
    if meta.get("dgucdir.layout") == "moco_v2":
        state = {"net." + k[len(MOCO_PREFIX):]: v for k, v in state.items()}
    encoder = Encoder(cfg.model.arch, cfg.model.proj_dim)
    encoder.load_state_dict(state)
    return encoder, cfg


def baseline_encoder(cfg: Config, init: str, moco_path: str | None = None) -> Encoder:
    """An untrained encoder of ``cfg``'s architecture: ``init`` 'random' (seeded by train.seed) or 'moco-v2'."""
    torch.manual_seed(cfg.train.seed)
    encoder = Encoder(cfg.model.arch, cfg.model.proj_dim)
    if init == "moco-v2":
        if not moco_path:
            raise CheckpointError("--init moco-v2 needs the checkpoint path: --init moco-v2 PATH")
        load_moco_v2(encoder, moco_path)
    elif init != "random":
        raise CheckpointError(f"--init {init}: expected 'random' or 'moco-v2 PATH'")
    return encoder
