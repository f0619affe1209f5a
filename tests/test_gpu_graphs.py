"""Every DALI graph the GPU path builds, defined with ``device_id=0`` on a machine without a GPU.

Defining a graph needs no device: DALI checks where every operator runs and where each of its
inputs and named arguments lives when the graph is defined, and builds it (which needs the GPU)
only at its first run. So argument placement, dtype and layout errors of the GPU graphs surface
here, in the CPU suite, instead of at the first training step on a cluster. (It caught
``contrast_center`` computed from GPU images: DALI takes named arguments from the CPU only.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dgucdir.data import pipeline
from dgucdir.data.manifest import Manifest
from dgucdir.data.reader import IndexedSource, SampleReader
from dgucdir.data.spec import PipelineSpec

GPU = PipelineSpec(image_size=48, shard_id=0, num_shards=2, device_id=0, num_threads=1)


def _source(domain, fields, batch=4) -> IndexedSource:
    return IndexedSource(SampleReader([domain]), [0] * batch, list(range(batch)), batch, fields)


@pytest.mark.parametrize("order", ["global", "shard"])
@pytest.mark.parametrize("with_raw", [False, True], ids=["views", "views+bank"])
def test_training_graph_is_defined_for_the_gpu(demo_manifest, order, with_raw):
    """Mixed decoding, two MoCo v2 views on the GPU (and the bank's raw resize); by index or by the shard reader."""
    domain = Manifest.load(demo_manifest).domain("ink")
    source = _source(domain, ("encoded", "label", "index")) if order == "global" else None
    pipe = pipeline.train_pipeline(domain, GPU, 4, seed=1, initial_fill=8, source=source, with_raw=with_raw)
    assert pipe.device_id == 0 and not pipe._built


def test_partner_graph_is_defined_for_the_gpu(demo_manifest):
    """Per-view raw partners (and a resumed bank's content): decoded by nvJPEG, resized on the GPU."""
    domain = Manifest.load(demo_manifest).domain("ink")
    pipe = pipeline.partner_pipeline(_source(domain, ("encoded", "index", "domain")), GPU, seed=2)
    assert pipe.device_id == 0 and not pipe._built


def test_eval_graph_is_defined_for_the_gpu(demo_manifest):
    pipe = pipeline.eval_pipeline(Manifest.load(demo_manifest).domain("sketch"), GPU, 8)
    assert pipe.device_id == 0 and not pipe._built


def test_a_named_argument_from_gpu_data_is_refused_at_definition():
    """The check above can fail: the old graph's ``contrast_center`` from GPU images is refused here."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=2, num_threads=1, device_id=0)
    def old_jitter():
        images = fn.external_source(name="x", layout="HWC", dtype=types.UINT8).gpu()
        mean_grey = fn.reductions.mean(fn.color_space_conversion(images, image_type=types.RGB,
                                                                 output_type=types.GRAY))
        return fn.brightness_contrast(images, contrast=1.2, contrast_center=mean_grey)

    with pytest.raises(ValueError, match="Named arguments must be on CPU"):
        old_jitter()


def test_contrast_arithmetic_equals_brightness_contrast_on_every_pixel():
    """The jitter's b * (m + c * (x - m)) with a saturating cast gives DALI's ``brightness_contrast`` with
    ``contrast_center=m`` exactly (the operator it replaced, which cannot take m from the GPU)."""
    from nvidia.dali import fn, pipeline_def, types

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8) for i in range(8)]

    @pipeline_def(batch_size=8, num_threads=1, device_id=None, seed=3)
    def both():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        m = fn.reductions.mean(fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY))
        b, c = fn.random.uniform(range=[0.6, 1.4]), fn.random.uniform(range=[0.6, 1.4])
        reference = fn.brightness_contrast(x, brightness=b, contrast=c, contrast_center=m)
        scaled = b * (m + c * (fn.cast(x, dtype=types.FLOAT) - m))
        return reference, fn.cast(scaled, dtype=types.UINT8), scaled

    pipe = both()
    out_of_range = 0
    for _ in range(3):
        reference, ours, scaled = pipe.run()
        for i in range(8):
            r, o = np.array(reference[i]), np.array(ours[i])
            assert r.dtype == o.dtype == np.uint8 and np.array_equal(r, o), i
            out_of_range += int(((np.array(scaled[i]) > 255) | (np.array(scaled[i]) < 0)).sum())
    assert out_of_range > 0  # the saturating cast was exercised, and clamps as the operator does


def test_the_pipelines_run_on_the_cpu_as_defined(demo_manifest):
    """The same definitions with ``device_id=None`` build at their first run and give uint8 CHW views."""
    domain = Manifest.load(demo_manifest).domain("ink")
    cpu = PipelineSpec(48, 0, 1, None, 1)
    v1, v2, label, index, raw = pipeline.train_pipeline(domain, cpu, 4, seed=1, initial_fill=8,
                                                        source=_source(domain, ("encoded", "label", "index")),
                                                        with_raw=True).run()
    for out in (v1, v2, raw):
        t = torch.from_dlpack(out.as_tensor())
        assert t.shape == (4, 3, 48, 48) and t.dtype == torch.uint8
    assert np.array(index.as_tensor()).ravel().tolist() == [0, 1, 2, 3]
