"""read_grey: grey pixels from every bit depth a face image comes in, or an error that names the file."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ngd_ext.data.files import SIXTEEN_BIT_GREY, read_grey


@pytest.mark.parametrize("name,dtype", [("a.png", "<u2"), ("a.tif", "<u2"), ("a.tif", ">u2")])
def test_sixteen_bit_grey_is_scaled_to_eight_bits(tmp_path, name, dtype):
    values = np.concatenate([np.arange(256) * 257, [1, 128, 129, 385, 386, 65534]]).astype(np.uint16)
    path = tmp_path / name
    Image.fromarray(values.reshape(2, -1).astype(dtype)).save(path)
    with Image.open(path) as image:
        assert image.mode in SIXTEEN_BIT_GREY
    grey = read_grey(path, upright=False)
    assert grey.dtype == np.uint8
    # v * 257 (an 8-bit image widened) gives v back; other values round to the nearest
    np.testing.assert_array_equal(grey.ravel(), [*range(256), 0, 0, 1, 1, 2, 255])


def test_eight_bit_grey_and_colour_are_unchanged(tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, (12, 20), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "colour.png")
    np.testing.assert_array_equal(read_grey(tmp_path / "grey.png", upright=True), grey)
    np.testing.assert_array_equal(read_grey(tmp_path / "colour.png", upright=True), grey)


@pytest.mark.parametrize("array,kind", [
    (np.full((8, 8), 0.5, np.float32), r"32-bit floating-point image \(PIL mode F\)"),
    (np.full((8, 8), 40000, np.int32), r"32-bit integer image \(PIL mode I\)"),
])
def test_images_without_a_fixed_range_are_refused(tmp_path, array, kind):
    path = tmp_path / "a.tif"
    Image.fromarray(array).save(path)
    with pytest.raises(OSError, match=f"{path}: a {kind}.*save it with 8 or 16 bits per sample"):
        read_grey(path, upright=False)


def test_an_image_whose_header_claims_a_vast_size_is_refused(tmp_path):
    """Pillow refuses to decode more than about 179 million pixels (a decompression bomb); a damaged header can claim
    that many, and it was an error of Pillow's own type rather than the OSError every reader handles."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)  # 900 million grey pixels
    path = tmp_path / "vast.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 30001))
                     + chunk(b"IEND", b""))
    with pytest.raises(OSError, match=rf"{path}: Image size \(900000000 pixels\) exceeds limit"):
        read_grey(path, upright=True)
