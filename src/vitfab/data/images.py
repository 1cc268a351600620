"""Reading ImageFolder datasets (``<class>/<image>``) and normalising every image to RGB."""

from __future__ import annotations

import errno
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError, VitfabError
from ..options import option
from ..progress import console, task

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SKIP_HINT = "use --skip-bad-images to skip such files"
MAX_IMAGE_PIXELS = 178_956_970  # PIL's own default limit (a decompression bomb above it)


def skip_bad_option() -> bool:
    """The ``--skip-bad-images`` field of every config that reads images."""
    return option(False, help="Skip unreadable images with a warning.")


def max_pixels_option() -> int:
    """The ``--max-image-pixels`` field of every config that reads images."""
    return option(MAX_IMAGE_PIXELS, help="Refuse images of more pixels (width x height) than this, before decoding "
                                         "them (a 20,000 x 20,000 image decodes to 1.2 GB of RGB); default PIL's limit.")


@dataclass
class ScanOptions:
    """How a folder of labelled images is checked (``vitfab data info``)."""

    skip_bad_images: bool = skip_bad_option()
    max_image_pixels: int = max_pixels_option()


def check_max_pixels(max_pixels: int | None) -> None:
    if max_pixels is not None and max_pixels < 1:
        raise VitfabError(f"--max-image-pixels must be at least 1, got {max_pixels}")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, RGB, RGBA, palette and 16-bit/float images as 8-bit, 3-channel RGB.

    16-bit images (common for X-ray detectors) are scaled by their bit depth, not per image,
    so that intensity keeps its meaning across a dataset; float images are scaled to their
    own min-max range.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(arr / 257.0, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(np.nan_to_num(arr).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


@contextmanager
def _own_pixel_limit() -> Iterator[None]:
    """PIL's global decompression-bomb limit off while :func:`load_image` applies its own."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def load_image(path: str | Path, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image fully (a truncated file fails here, not later) and return it as RGB.

    An image of more than ``max_pixels`` pixels is refused from its header, before decoding;
    ``None``: no limit (for images a scan has already checked).
    """
    path = Path(path)
    try:
        with _own_pixel_limit(), Image.open(path) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise DataError(f"image too large: {path} is {img.width} x {img.height} = {img.width * img.height:,} "
                                f"pixels, above the limit of {max_pixels:,} (--max-image-pixels)")
            img.load()
            return to_rgb(img)
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            raise  # the machine's limit, not this image (vitfab.boundary says so)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"unreadable image {path}: {reason}") from None


@dataclass
class ImageFolderIndex:
    """What a scan of an ImageFolder found: classes and (relative path, class index) samples."""

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def class_counts(self) -> dict[str, int]:
        counts = {c: 0 for c in self.classes}
        for _, y in self.samples:
            counts[self.classes[y]] += 1
        return counts


def _require_dir(root: Path) -> None:
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"data path is not a folder: {root}")


def list_class_folders(root: str | Path) -> list[str]:
    root = Path(root)
    _require_dir(root)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))


def check_images(
    paths: Iterable[Path],
    skip_bad: bool,
    on_progress: Callable[[], None] | None = None,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> tuple[list[Path], list[tuple[str, str]]]:
    """Decode each image; return the good ones and the (path, reason) of the skipped ones.

    Without ``skip_bad`` the first unreadable (or too large) image raises :class:`DataError`.
    """
    good, skipped = [], []
    for p in paths:
        try:
            load_image(p, max_pixels)
            good.append(p)
        except DataError as exc:
            if not skip_bad:
                raise DataError(f"{exc} ({SKIP_HINT})") from None
            skipped.append((str(p), str(exc)))
        if on_progress is not None:
            on_progress()
    return good, skipped


def scan_image_folder(
    root: str | Path,
    skip_bad: bool = False,
    validate: bool = True,
    on_progress: Callable[[], None] | None = None,
    classes: list[str] | None = None,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> ImageFolderIndex:
    """Index an ImageFolder dataset, checking every image can be decoded.

    ``classes`` fixes the class list (and order), e.g. that of a trained model; otherwise
    the sorted sub-folder names are the classes.
    """
    root = Path(root)
    found = list_class_folders(root)
    if not found:
        raise DataError(f"{root} has no class folders: expected the layout <class>/<image>")
    if classes is None:
        classes = found
        if len(classes) < 2:
            raise DataError(
                f"{root} has only one class folder ('{classes[0]}'): classification needs at least two"
            )
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(f"{root} has class folders the model does not know: {', '.join(unknown)}")
    per_class = {}
    for name in classes:
        folder = root / name
        per_class[name] = list_images(folder) if folder.is_dir() else []
        if folder.is_dir() and not per_class[name]:
            raise DataError(f"class folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    samples: list[tuple[str, int]] = []
    skipped: list[tuple[str, str]] = []
    for y, name in enumerate(classes):
        paths = per_class[name]
        if validate:
            paths, bad = check_images(paths, skip_bad, on_progress, max_pixels)
            skipped.extend(bad)
            if not paths and per_class[name]:
                raise DataError(f"class folder {root / name} has no readable images")
        samples.extend((p.relative_to(root).as_posix(), y) for p in paths)
    return ImageFolderIndex(root=root, classes=list(classes), samples=samples, skipped=skipped)


def count_images(root: str | Path) -> int:
    """How many image files an ImageFolder holds (for sizing a progress bar)."""
    root = Path(root)
    return sum(len(list_images(root / c)) for c in list_class_folders(root))


def report_skipped(skipped: list[tuple[str, str]]) -> None:
    """The warning that lists the images ``--skip-bad-images`` left out."""
    if not skipped:
        return
    console.print(f"[yellow]warning:[/] skipped {len(skipped)} unreadable image(s):")
    for path, reason in skipped:
        console.print(f"  {path}: {reason}", highlight=False, markup=False)


def scan_checked(
    root: str | Path, skip_bad: bool = False, progress: bool = True, classes: list[str] | None = None,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> ImageFolderIndex:
    """:func:`scan_image_folder` with a progress bar and the skipped-images warning."""
    check_max_pixels(max_pixels)
    with task("checking images", total=count_images(root), enabled=progress) as advance:
        index = scan_image_folder(root, skip_bad=skip_bad, on_progress=advance, classes=classes,
                                  max_pixels=max_pixels)
    report_skipped(index.skipped)
    return index
