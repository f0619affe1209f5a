"""What "fp32" means on a GPU, and how repeatable a run is: TF32 and deterministic algorithms.

On Ampere and later GPUs PyTorch runs float32 convolutions in TF32 by default (10-bit mantissa),
so a run configured "fp32, as the original" would silently train in another precision; float32
matmuls default to IEEE. ``train.tf32`` sets both explicitly (default false: true float32, the
paper's numerics; bf16 autocast is the faster setting to ask for, and it says what it is).

``train.deterministic`` asks PyTorch for deterministic kernels where it has them (cuDNN's
convolution algorithms, index_add_ in k-means) and fixes cuBLAS's workspace, so that the same
inputs give the same bits run after run on the same GPU and software: on a GPU, the condition
for a resumed run to continue bit for bit as the uninterrupted one. An operation with no
deterministic kernel warns instead of failing (``warn_only``), so the warning names what is left.
On the CPU every kernel used here is deterministic already.
"""

from __future__ import annotations

import os

import torch


def apply_numerics(tf32: bool, deterministic: bool) -> dict[str, str]:
    """Sets this process's float32 and determinism modes; returns them as run tags (read back)."""
    mode = "tf32" if tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode
    if deterministic:
        # before the first cuBLAS handle; a launcher's own setting wins
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    return {"dgucdir.tf32": str(tf32).lower(),
            "dgucdir.fp32_precision": f"matmul={torch.backends.cuda.matmul.fp32_precision},"
                                      f"conv={torch.backends.cudnn.conv.fp32_precision}",
            "dgucdir.deterministic": str(torch.are_deterministic_algorithms_enabled()).lower()}
