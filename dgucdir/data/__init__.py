"""Data: packing, the demo datasets, DALI pipelines, the Fourier augmentation, the training loader."""

import importlib.util


def _dali_installed() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # not even the `nvidia` namespace
        return False


if not _dali_installed():  # an extra: DALI is built per CUDA major version
    raise ModuleNotFoundError("NVIDIA DALI is not installed: pip install 'dgucdir[cu13]' (CUDA 13 driver) or "
                              "'dgucdir[cu12]' (CUDA 12 driver); its CPU pipelines need no GPU")
