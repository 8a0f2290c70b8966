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


PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-12345", "PatientBirthDate": "19700101"}


def write_dicom(path, stored, photometric="MONOCHROME2", bits_stored=12, preamble=True, **tags):
    """A DX DICOM of the integer array `stored` (pixels as stored), with patient tags and `tags` set.

    `preamble=False` writes the bare dataset (no 128-byte preamble, no "DICM",
    no file meta), as old archives hold some `.dcm` files.
    """
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    ds.Modality = "DX"
    for key, value in {**PATIENT, **tags}.items():
        setattr(ds, key, value)
    ds.set_pixel_data(np.asarray(stored), photometric, bits_stored)
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:
        del ds.file_meta
        ds.save_as(path, implicit_vr=True, little_endian=True)
    return str(path)


def dicom_of(image, path, photometric="MONOCHROME2", bits_stored=16):
    """`image` (uint8 gray) as a DICOM of `bits_stored` bits that shows the same picture (MONOCHROME1 stored inverted)."""
    top = 2**bits_stored - 1
    stored = np.rint(image.astype("float64") / 255 * top).astype("uint16")
    return write_dicom(path, top - stored if photometric == "MONOCHROME1" else stored, photometric, bits_stored)
