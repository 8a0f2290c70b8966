"""DICOM X-rays as the [0, 1] grayscale a radiologist's viewer shows: pydicom reads, this module maps.

A file is DICOM when bytes 128-131 are "DICM" (the Part 10 preamble), or
when it is named `.dcm` (then read without a preamble). Its pixels become
values in [0, 1], as the viewer pipeline of PS3.4 N.2 does it:

1. The stored values (`pixel_array`) go through the modality LUT
   (`pydicom.pixels.apply_modality_lut`: rescale slope and intercept, or a
   Modality LUT Sequence), then the VOI LUT (`apply_voi_lut`: the first VOI
   LUT Sequence item, else the first window centre and width with the file's
   VOI LUT Function; neither: unchanged). Call the result v.
2. v maps linearly onto [0, 1] from the range [lo, hi] the VOI step can
   output: x = (v - lo) / (hi - lo), clipped to [0, 1], where
   - with a VOI LUT: lo = 0, hi = 2**n - 1, n = the LUT's bits per entry
     (third value of its LUT Descriptor), as PS3.3 C.11.2.1.1 defines it;
   - with a window: lo and hi are what the window gives below and above it
     (pydicom's output range, from Bits Stored, Pixel Representation and the
     rescale): below the window is 0, above it 1, the window linear (or the
     sigmoid) between;
   - with neither: the full stored range through the modality LUT: the
     lowest and highest value Bits Stored and Pixel Representation allow
     (0 .. 2**b - 1 unsigned, -2**(b-1) .. 2**(b-1) - 1 signed), rescaled
     (ordered, so a negative slope keeps high values bright), or
     0 .. 2**n - 1 for a Modality LUT Sequence of n bits.
3. MONOCHROME1 (pydicom does not invert it): x -> 1 - x, so bone is bright.
4. x is stored as a 16-bit grayscale PNG, round(65535 x): every command
   decodes a DICOM through this PNG (`to_png`), with the same TensorFlow
   decoder and resize as any image, so fit, evaluate, predict (a Keras model
   or a SavedModel) and serve see the same pixels.

Refused, with a reason naming no patient data (`DicomError`): multi-frame,
colour (Samples per Pixel other than 1, or a Photometric Interpretation
other than MONOCHROME1/2), no pixel data, and transfer syntaxes that the
installed decoders cannot read. pydicom alone reads uncompressed (implicit
or explicit VR, little or big endian), deflated and RLE Lossless files; with
Pillow (a dependency) JPEG Baseline and JPEG 2000 too. JPEG Lossless (common
for CR/DX) and JPEG-LS need pylibjpeg with pylibjpeg-libjpeg, or python-gdcm.

Only the tags that say how to show the pixels are read: the patient's
tags (name, ID, ...) are never touched, so no message can carry them.
"""

import importlib.metadata
import io
import warnings

import numpy as np

PREAMBLE = 128  # bytes before the "DICM" prefix of a Part 10 file
PREFIX = b"DICM"
SUFFIX = ".dcm"
PNG_MAX = 65535  # 16-bit PNG
# pydicom's optional pixel decoders: a change of them can change which files read (see `decoders_stamp`).
DECODER_PACKAGES = ("pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "python-gdcm", "pyjpegls")

# pydicom warns about odd values of the elements it converts, quoting them; those may be a patient's.
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


class DicomError(ValueError):
    """A DICOM file that cxrkeras cannot read: the message says why, never with the file's patient tags."""


def is_dicom(head, name=""):
    """True when `head` (a file's first 132 bytes or more) holds the DICOM prefix, or `name` ends in .dcm."""
    return head[PREAMBLE : PREAMBLE + len(PREFIX)] == PREFIX or str(name).lower().endswith(SUFFIX)


def decoders_stamp():
    """pydicom's version and its optional decoders', which decide what reads (for cached verdicts)."""
    found = []
    for name in ("pydicom",) + DECODER_PACKAGES:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def read(file, pixels=True):
    """The dataset in the open binary `file` (without its pixel data unless `pixels`); DicomError if it is none."""
    import pydicom

    file.seek(0)
    try:
        ds = pydicom.dcmread(file, force=True, stop_before_pixels=not pixels)
    except Exception as e:  # pydicom raises many kinds (struct.error, EOFError, KeyError...) for a broken file
        raise DicomError(f"not a readable DICOM file ({type(e).__name__}: {e})") from None
    if "TransferSyntaxUID" not in ds.file_meta:  # no Part 10 header: the encoding pydicom found when reading
        ds.file_meta.TransferSyntaxUID = _transfer_syntax(*ds.original_encoding)
    try:
        check_readable(ds)
    except DicomError:
        raise
    except Exception as e:  # an image tag whose value does not convert (Number of Frames "1A"...)
        raise DicomError(f"DICOM with an unreadable image tag ({type(e).__name__}: {_one_line(e)})") from None
    return ds


def _transfer_syntax(implicit_vr, little_endian):
    from pydicom import uid

    if implicit_vr:
        return uid.ImplicitVRLittleEndian
    return uid.ExplicitVRLittleEndian if little_endian else uid.ExplicitVRBigEndian


def check_readable(ds):
    """Raise DicomError when `ds` is no single grayscale frame in a transfer syntax the installed decoders read."""
    from pydicom.pixels import get_decoder

    if "Rows" not in ds or "Columns" not in ds:
        raise DicomError("DICOM without an image (no Rows and Columns): not an X-ray")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise DicomError(f"multi-frame DICOM ({frames} frames): cxrkeras reads single-frame X-rays only")
    samples = int(ds.get("SamplesPerPixel") or 1)
    if samples != 1:
        raise DicomError(f"colour DICOM (Samples per Pixel {samples}): cxrkeras reads grayscale X-rays only")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(f"DICOM with Photometric Interpretation {photometric!r}: expected MONOCHROME1 or MONOCHROME2")
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DicomError(f"DICOM in transfer syntax {syntax.name} ({syntax}), which pydicom has no decoder for") from None
    if not decoder.is_available:
        needs = "; or ".join(decoder.missing_dependencies)
        raise DicomError(
            f"DICOM compressed as {syntax.name} ({syntax}), which the installed decoders cannot read "
            f"(install one of: {needs})"
        )


def declared_size(file):
    """(width, height) from the header of the DICOM in the open binary `file`, its pixel data not read.

    Raises DicomError for a file `read` would refuse (multi-frame, colour...).
    """
    ds = read(file, pixels=False)
    return int(ds.Columns), int(ds.Rows)


def pixels(ds):
    """The [height, width] float64 in [0, 1] that dataset `ds` shows (steps 1-3 of the module docstring)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if "PixelData" not in ds:
        raise DicomError("DICOM without pixel data")
    try:
        values = apply_modality_lut(ds.pixel_array, ds)
        if _voi(ds) == "lut" and values.dtype.kind == "f":
            values = np.rint(values).astype(np.int64)  # a VOI LUT is indexed by whole values
        values = apply_voi_lut(values, ds)
        lo, hi = voi_range(ds)
    except Exception as e:  # the decoders raise RuntimeError, ValueError, NotImplementedError... for bad data
        syntax = ds.file_meta.TransferSyntaxUID.name
        raise DicomError(f"DICOM pixel data ({syntax}) does not decode ({type(e).__name__}: {_one_line(e)})") from None
    if values.ndim != 2:
        raise DicomError(f"DICOM pixel data of shape {list(values.shape)}: expected one grayscale frame")
    if hi == lo:
        raise DicomError(f"DICOM whose displayed range is empty ({lo} to {hi})")
    x = np.clip((values.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)
    return 1.0 - x if ds.PhotometricInterpretation == "MONOCHROME1" else x


def _voi(ds):
    """Which VOI step `apply_voi_lut` takes for `ds`: "lut", "window" or None (its own rules)."""
    item = ds.VOILUTSequence[0] if ds.get("VOILUTSequence") else None
    if item is not None and item.get("LUTDescriptor") is not None and item.get("LUTData") is not None:
        return "lut"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return "window"
    return None


def voi_range(ds):
    """(lo, hi): the values the VOI step outputs for the lowest and highest input (step 2 of the docstring)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    voi = _voi(ds)
    if voi == "lut":
        return 0, 2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1
    if voi == "window":
        lo, hi = apply_voi_lut(np.array([-np.inf, np.inf]), ds)
        return float(lo), float(hi)
    if ds.get("ModalityLUTSequence"):
        return 0, 2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
    bits = int(ds.BitsStored)
    stored = np.array([0, 2**bits - 1] if ds.PixelRepresentation == 0 else [-(2 ** (bits - 1)), 2 ** (bits - 1) - 1])
    lo, hi = sorted(apply_modality_lut(stored, ds))
    return float(lo), float(hi)


def _one_line(error):
    """The error's message on one line (the decoders list each plugin's reason on its own line)."""
    return " ".join(str(error).split())


def to_png(file):
    """The DICOM in the open binary `file` as a 16-bit grayscale PNG of its [0, 1] pixels (step 4)."""
    from PIL import Image

    x = pixels(read(file))
    buffer = io.BytesIO()
    Image.fromarray(np.rint(x * PNG_MAX).astype(np.uint16)).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()
