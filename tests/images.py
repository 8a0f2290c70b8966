"""Image files that lie: made by the tests, never shipped."""

import io
import struct
import zlib

import numpy as np
from PIL import Image


def png_chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_declaring(width, height):
    """200 bytes: a valid PNG header declaring width x height gray pixels, then a truncated stream."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return (b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)[:20])).ljust(200, b"\0")


def png_with_bad_crc():
    """A whole PNG whose image-data checksum is wrong: Pillow decodes it, TensorFlow refuses it."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 30), 128, "uint8")).save(buffer, "PNG")
    png = bytearray(buffer.getvalue())
    at = png.index(b"IDAT")
    (length,) = struct.unpack(">I", png[at - 4 : at])
    png[at + 4 + length] ^= 0xFF  # first byte of the IDAT chunk's CRC
    return bytes(png)
