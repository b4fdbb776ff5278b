"""Integer pixels of no fixed range (int64 from Python ints, signed types) are refused by name
instead of read as 16-bit; uint16 and Pillow's 32-bit 'I' images of 16-bit values keep working."""
from __future__ import annotations

import numpy as np
import pytest

from deepbase_duck.corpora.images import pil_rgb, unit_rgb
from deepbase_duck.errors import DeepBaseError

RNG = np.random.default_rng(19)
U8 = RNG.integers(0, 256, (5, 6, 3)).astype(np.uint8)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int16, np.int8, np.uint32, np.uint64])
def test_integer_pixels_without_a_fixed_range_are_refused(dtype):
    """int64 pixels of 0..255 (np.array of Python ints) used to be divided by 65535: nearly black
    (200 -> 0.003); int8 below 0 clipped to 0. Now refused, naming the dtype, the values and the
    casts that say what they mean."""
    a = (U8.astype(np.int64) - (100 if np.issubdtype(dtype, np.signedinteger) else 0)).astype(dtype)
    with pytest.raises(DeepBaseError, match=rf"record 7: {np.dtype(dtype).name} pixels \(values "
                                            rf"{a.min()}\.\.{a.max()}\).*astype\(np\.uint8\).*astype\(np\.uint16\)"):
        unit_rgb(a, "record 7")


def test_uint8_uint16_and_bool_keep_their_rule():
    np.testing.assert_allclose(unit_rgb(U8), U8 / 255.0)
    u16 = U8.astype(np.uint16) * 257
    np.testing.assert_allclose(unit_rgb(u16), u16 / 65535.0)
    np.testing.assert_allclose(unit_rgb(U8 > 100), (U8 > 100).astype(float))


def test_a_pillow_32_bit_image_of_16_bit_values_is_read_as_16_bit():
    """Pillow opens some 16-bit PNGs in mode 'I' (int32): their values are 16-bit, read as such."""
    from PIL import Image
    grey = RNG.integers(0, 65536, (5, 6)).astype(np.int32)
    im = Image.fromarray(grey)
    assert im.mode == "I"
    got = pil_rgb(im, "file")
    want = np.rint(np.repeat((grey / 65535.0)[:, :, None], 3, 2) * 255.0).astype(np.uint8)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(DeepBaseError, match="int32 pixels"):
        pil_rgb(Image.fromarray(grey - 70000, mode="I"), "file")
