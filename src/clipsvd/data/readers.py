"""What the MONAI readers need from clipsvd: PIL images as a viewer shows them, and why a file
cannot be read, in words a user can act on.

MONAI's PILReader hands PIL's raw values on: a palette image's indices, CMYK's four ink
channels, an alpha channel that joins the intensity scaling. ``viewer_image`` turns every PIL
mode into what a viewer displays first. When a reader fails, MONAI wraps the cause in
``applying transform <... object at 0x...>``; ``explain_read_error`` looks at the file again
and says what is wrong with it, so the message (and provenance.json) is the same every run.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

# PIL modes whose values are intensities (16/32-bit integers, floats): kept as numbers for the
# intensity step, as a viewer windows them.
NUMERIC_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
KEPT_MODES = NUMERIC_MODES | {"L", "RGB"}
GREY_MODES = frozenset({"1", "LA", "La"})  # 1-bit as 0/255; grey + alpha without the alpha
EXIF_ORIENTATION = 0x0112
VIEWER_RULES = ("EXIF orientation applied; 1 -> L (0/255); LA, La -> L (alpha dropped); "
                "L, RGB, I, I;16*, F kept; every other mode (P, PA, RGBA, RGBX, RGBa, CMYK, "
                "YCbCr, LAB, HSV) -> RGB as PIL's Image.convert('RGB') gives it")


class UnreadableImage(ValueError):
    """A file clipsvd refuses to read; the message says why and is shown as is."""


def viewer_image(image):
    """The pixels a viewer shows for a PIL image (VIEWER_RULES); alpha is dropped, not blended."""
    from PIL import ImageOps

    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in KEPT_MODES:
        return image
    if mode in GREY_MODES:
        return (image.convert("LA") if mode == "La" else image).convert("L")
    return image.convert("RGB")


def check_nifti_dimensions(path: str) -> None:
    """A 4D NIfTI (time points, channels) is not one image or volume: refuse it, do not let
    MONAI turn its fourth axis into colour channels."""
    import nibabel as nib

    shape = nib.load(path).shape  # the header only
    if len(shape) > 3 and any(int(n) > 1 for n in shape[3:]):
        dims = "×".join(str(int(n)) for n in shape)
        raise UnreadableImage(f"a {len(shape)}D NIfTI (shape {dims}); clipsvd reads 2D images "
                              "and 3D volumes: split it into 3D files (one per time point or "
                              "channel, e.g. with nibabel or fslsplit) and list those")


def _reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return scrub(f"{type(exc).__name__}: {lines[-1] if lines else ''}")[:300]


def scrub(text: str) -> str:
    """Drop object addresses, which differ from run to run."""
    text = re.sub(r"<([^<>]*?) (object )?at 0x[0-9a-fA-F]+>", r"<\1>", text)
    return re.sub(r"0x[0-9a-fA-F]{6,}", "0x…", " ".join(text.split()))


def _root_cause(exc: BaseException) -> BaseException:
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, UnreadableImage):
            return exc
        nxt = exc.__cause__ or exc.__context__
        if nxt is None:
            return exc
        exc = nxt
    return exc


def _pil_problem(path: str) -> str | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            kind = image.format or "image"
            try:
                viewer_image(image).load()
            except Exception as exc:  # noqa: BLE001 - every decoder failure means the same
                return f"the {kind} data is truncated or corrupt ({_reason(exc)})"
    except UnidentifiedImageError:
        return ("not an image file PIL can read (is it really a "
                f"{Path(path).suffix.lstrip('.').upper() or 'image'} file?)")
    except Exception as exc:  # noqa: BLE001
        return f"the image is truncated or corrupt ({_reason(exc)})"
    return None


def _dicom_file_problem(path: Path) -> str | None:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        return "not a DICOM file (no DICM marker after the 128-byte preamble)"
    except Exception as exc:  # noqa: BLE001
        return f"not a readable DICOM file ({_reason(exc)})"
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return ("the DICOM file has no pixel data (no PixelData element: a report, structured "
                "document or other object that is not an image)")
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if uid is not None and uid.is_compressed:
        from pydicom.pixels import get_decoder

        try:
            decoder = get_decoder(uid)
        except NotImplementedError:
            return (f"its pixel data is compressed as {uid.name} (transfer syntax {uid}), which "
                    "pydicom cannot decode; convert the file to uncompressed DICOM")
        if not decoder.is_available:
            missing = "; ".join(" ".join(m.split()) for m in decoder.missing_dependencies)
            return (f"its pixel data is compressed as {uid.name} (transfer syntax {uid}) and no "
                    f"installed package decodes it; install one of the decoders ({missing}) "
                    "or convert the file to uncompressed DICOM")
    try:
        ds.pixel_array
    except Exception as exc:  # noqa: BLE001
        return f"its pixel data cannot be decoded ({_reason(exc)})"
    return None


def _dicom_problem(path: str) -> str | None:
    p = Path(path)
    if not p.is_dir():
        return _dicom_file_problem(p)
    for slice_path in sorted(q for q in p.iterdir() if q.is_file()):
        problem = _dicom_file_problem(slice_path)
        if problem:
            return f"{slice_path.name}: {problem}"
    return None


def _nifti_problem(path: str) -> str | None:
    import nibabel as nib

    try:
        check_nifti_dimensions(path)
        nib.load(path).get_fdata()
    except UnreadableImage as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001
        return f"not a readable NIfTI file, or its data is truncated ({_reason(exc)})"
    return None


def explain_read_error(path: str, kind: str, exc: BaseException) -> str:
    """Why ``path`` could not be read: the file's own problem when one can be found, else the
    innermost cause of ``exc``; never an object address."""
    cause = _root_cause(exc)
    if isinstance(cause, UnreadableImage):
        return scrub(str(cause))
    try:
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            return "the file is empty (0 bytes)"
    except OSError as error:
        return f"cannot open it ({error.strerror})"
    problem = {"pil": _pil_problem, "dicom": _dicom_problem,
               "nifti": _nifti_problem}.get(kind, lambda _: None)(path)
    return scrub(problem) if problem else _reason(cause)
