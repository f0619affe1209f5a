"""DALI pipelines: the training pipeline (two MoCo v2 views per sample) and the eval pipeline.

One code path for GPU and CPU: with a GPU the JPEGs are decoded by nvJPEG (``device="mixed"``)
and the augmentations run on the GPU; without one the same graph runs on the CPU
(``device_id=None``). The augmentations are small composable functions in the manner of
solo-learn's DALI loader. Random decisions that the MoCo v2 recipe applies with a probability
(colour jitter, grayscale, blur) are folded into the operator arguments (a jitter factor of 1
is the identity), which keeps the graph free of per-sample branches.

The functions return pipelines defined, not built (DALI builds one at its first run). Defining a
graph with ``device_id=0`` needs no GPU and checks where every argument lives, so the CPU test
suite defines every GPU graph (``tests/test_gpu_graphs.py``).
"""

from __future__ import annotations

from ..extras import require

require("nvidia.dali", "cu13", "A DALI pipeline (training or evaluation images)", "'dgucdir[cu12]' for a CUDA 12 driver")
from nvidia.dali import fn, pipeline_def, types  # noqa: E402 (after the check that names the extra)

from .manifest import IMAGE_EXTS, INDEX_EXT, LABEL_EXT, Domain  # noqa: E402
from .reader import IndexedSource  # noqa: E402
from .spec import PipelineSpec  # noqa: E402

READER_NAME = "Reader"


def _reader(domain: Domain, shard_id: int, num_shards: int, shuffle: bool, initial_fill: int, seed: int):
    return fn.readers.webdataset(
        paths=[str(s.path) for s in domain.shards],
        index_paths=[str(s.index_path) for s in domain.shards],
        ext=[";".join(IMAGE_EXTS), LABEL_EXT, INDEX_EXT],
        dtypes=[types.UINT8, types.INT32, types.INT32],
        missing_component_behavior="error",
        shard_id=shard_id,
        num_shards=num_shards,
        random_shuffle=shuffle,
        initial_fill=initial_fill,
        pad_last_batch=not shuffle,
        stick_to_shard=True,  # wrap-around stays in this rank's shard: ranks never overlap
        seed=seed,
        name=READER_NAME,
    )


def _decode(encoded, on_gpu: bool):
    return fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB)


def _coin(p: float):
    return fn.cast(fn.random.coin_flip(probability=p), dtype=types.FLOAT)


def _jitter_factor(strength: float, apply):
    """A factor ~ U(1-s, 1+s) where ``apply`` is 1, and exactly 1 elsewhere."""
    u = fn.random.uniform(range=[1.0 - strength, 1.0 + strength])
    return 1.0 + apply * (u - 1.0)


def color_jitter_and_grayscale(images, p_jitter: float = 0.8, p_gray: float = 0.2):
    """torchvision ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, then RandomGrayscale(p=0.2).

    Contrast is scaled around each image's mean grey, as torchvision's ``adjust_contrast`` does
    (DALI's ``color_twist`` scales around 128, which on white-background domains also darkens
    the image). Brightness then contrast is b * (m + c * (x - m)), which equals torchvision's
    brightness followed by contrast up to clamping. It is written as arithmetic, not as
    ``brightness_contrast(contrast_center=m)``: the mean grey is computed from the images, which
    live on the GPU after mixed decoding, and DALI takes named arguments from the CPU only. The
    saturating cast rounds as ``brightness_contrast`` does (equal on every pixel, tested).
    Saturation and hue follow in one ``hsv`` call; the four run in this fixed order (torchvision
    draws a random order). Hue 0.1 of a turn is 36 degrees. Grayscale after the jitter is
    saturation 0, so it folds in.
    """
    apply = _coin(p_jitter)
    gray = _coin(p_gray)
    mean_grey = fn.reductions.mean(fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY))
    brightness, contrast = _jitter_factor(0.4, apply), _jitter_factor(0.4, apply)
    scaled = brightness * (mean_grey + contrast * (fn.cast(images, dtype=types.FLOAT) - mean_grey))
    images = fn.cast(scaled, dtype=types.UINT8)
    return fn.hsv(images, saturation=_jitter_factor(0.4, apply) * (1.0 - gray),
                  hue=apply * fn.random.uniform(range=[-36.0, 36.0]))


def gaussian_blur(images, p: float = 0.5, sigma_range: tuple[float, float] = (0.1, 2.0)):
    """MoCo v2's GaussianBlur(sigma in [0.1, 2]) with p=0.5, as a per-sample blend."""
    blurred = fn.gaussian_blur(images, sigma=fn.random.uniform(range=list(sigma_range)))
    keep = _coin(p)
    return fn.cast(keep * fn.cast(blurred, dtype=types.FLOAT) + (1.0 - keep) * fn.cast(images, dtype=types.FLOAT),
                   dtype=types.UINT8)


def moco_v2_view(images, size: int, crop_scale_min: float):
    """One MoCo v2 view: random resized crop, colour jitter, grayscale, blur, flip; uint8 CHW.

    The blur's sigma range [0.1, 2] is MoCo v2's at 224 px (SimCLR: a kernel of 10% of the
    image); it is scaled with ``size`` so that small images are not blurred out of recognition.
    """
    view = fn.random_resized_crop(images, size=[size, size], random_area=[crop_scale_min, 1.0],
                                  random_aspect_ratio=[3 / 4, 4 / 3])
    view = color_jitter_and_grayscale(view)
    scale = size / 224
    view = gaussian_blur(view, sigma_range=(0.1 * scale, 2.0 * scale))
    return fn.crop_mirror_normalize(view, mirror=fn.random.coin_flip(probability=0.5), dtype=types.UINT8,
                                    output_layout="CHW", mean=[0.0], std=[1.0])


def raw_view(images, size: int):
    """A raw partner image as the original makes it: resized to the square training size (bicubic, aspect
    not kept, as PIL's ``resize(img.size)``), no augmentation; uint8 CHW."""
    images = fn.resize(images, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)
    return fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW", mean=[0.0], std=[1.0])


def eval_view(images, size: int):
    """Resize the shorter side to 256/224 * size, centre crop ``size``; uint8 CHW."""
    images = fn.resize(images, resize_shorter=round(size * 256 / 224))
    return fn.crop_mirror_normalize(images, crop=[size, size], dtype=types.UINT8, output_layout="CHW",
                                    mean=[0.0], std=[1.0])


def _indexed(source: IndexedSource):
    """The source's fields (encoded bytes first), in its order."""
    dtypes = {"encoded": types.UINT8, "label": types.INT32, "index": types.INT32, "domain": types.INT32}
    return fn.external_source(source=source, num_outputs=len(source.fields), batch=True,
                              dtype=[dtypes[f] for f in source.fields])


def train_pipeline(domain: Domain, spec: PipelineSpec, batch_size: int, seed: int, initial_fill: int,
                   crop_scale_min: float = 0.2, source: IndexedSource | None = None, with_raw: bool = False):
    """One training domain, outputs (view1, view2, label, index), and with ``with_raw`` each sample's
    :func:`raw_view` from the same decode (the partner bank's input).

    Read in ``source``'s order (fields encoded, label, index; ``data.order=global``: this epoch's
    share of a global shuffle), or, without one, by the shard reader: this rank's fixed contiguous
    shard, shuffled in a buffer of ``initial_fill`` (``data.order=shard``).
    """

    @pipeline_def(batch_size=batch_size, num_threads=spec.num_threads, device_id=spec.device_id, seed=seed,
                  prefetch_queue_depth=2, exec_dynamic=True)
    def pipe():
        if source is not None:
            encoded, label, index = _indexed(source)
        else:
            encoded, label, index = _reader(domain, spec.shard_id, spec.num_shards, True, initial_fill, seed)
        images = _decode(encoded, spec.on_gpu)
        v1 = moco_v2_view(images, spec.image_size, crop_scale_min)
        v2 = moco_v2_view(images, spec.image_size, crop_scale_min)
        if with_raw:
            return v1, v2, label, index, raw_view(images, spec.image_size)
        return v1, v2, label, index

    return pipe()


def partner_pipeline(source: IndexedSource, spec: PipelineSpec, seed: int):
    """Raw training images (:func:`raw_view`) in ``source``'s order (fields encoded, index, domain): the
    per-view partners of ``augment.partner=per_view_raw``, and a resumed partner bank's content.
    Outputs (image, domain, index)."""

    @pipeline_def(batch_size=source.batch_size, num_threads=spec.num_threads, device_id=spec.device_id, seed=seed,
                  prefetch_queue_depth=2, exec_dynamic=True)
    def pipe():
        encoded, index, domain = _indexed(source)
        return raw_view(_decode(encoded, spec.on_gpu), spec.image_size), domain, index

    return pipe()


def eval_pipeline(domain: Domain, spec: PipelineSpec, batch_size: int):
    """Reads one domain in order (this rank's shard, padded), outputs (image, label, index)."""

    @pipeline_def(batch_size=batch_size, num_threads=spec.num_threads, device_id=spec.device_id, seed=0,
                  exec_dynamic=True)
    def pipe():
        encoded, label, index = _reader(domain, spec.shard_id, spec.num_shards, False, 1, 0)
        images = _decode(encoded, spec.on_gpu)
        return eval_view(images, spec.image_size), label, index

    return pipe()
