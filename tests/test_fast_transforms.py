"""The uint8 fast path of the DataModules' transforms is bitwise the torchvision v2 pipeline, random stream included."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from kd_lightning.data.base import ImageDataModule, UInt8Transform


class Fake(ImageDataModule):
    num_classes, in_channels, native_size = 10, 1, 28


CASES = {
    "pad + crop + flip": dict(image_size=32, augment=True, hflip=True),
    "crop only (no flips)": dict(image_size=28, augment=True, hflip=False),
    "pad, eval": dict(image_size=32, augment=False, hflip=True),
    "identity, eval": dict(image_size=28, augment=False, hflip=True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("channels", [1, 3])
def test_fast_path_equals_v2_bitwise_with_the_same_random_stream(case: str, channels: int) -> None:
    opts = dict(CASES[case])
    hflip = opts.pop("hflip")
    dm = Fake(**opts)
    dm.hflip = hflip
    fast = dm.train_transform() if dm.augment else dm.eval_transform()
    assert isinstance(fast, UInt8Transform)
    images = torch.randint(
        0, 256, (40, channels, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    torch.manual_seed(7)
    ref = [fast.pipeline(im) for im in images]
    state_ref = torch.get_rng_state()
    torch.manual_seed(7)
    out = [fast(im) for im in images]
    assert torch.equal(torch.get_rng_state(), state_ref)  # the same draws, so later randomness is unchanged
    for a, b in zip(ref, out):
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
        assert torch.equal(a.as_subclass(torch.Tensor), b)
    if opts["augment"]:  # the augmentation really acted: most outputs differ from the un-augmented image
        plain = Fake(image_size=opts["image_size"], augment=False).eval_transform()
        moved = sum(not torch.equal(o, plain(im)) for o, im in zip(out, images))
        assert moved >= len(out) // 2


def test_pil_images_and_other_ops_use_v2() -> None:
    dm = Fake(image_size=32, augment=True)
    fast = dm.train_transform()
    pil = Image.fromarray(torch.randint(0, 256, (28, 28), dtype=torch.uint8).numpy())
    torch.manual_seed(0)
    a = fast(pil)
    torch.manual_seed(0)
    b = fast.pipeline(pil)
    assert torch.equal(a, b) and a.shape == (1, 32, 32)
    resized = Fake(image_size=40, resize_mode="resize").eval_transform()
    assert isinstance(resized, v2.Compose)  # Resize has no fast path
