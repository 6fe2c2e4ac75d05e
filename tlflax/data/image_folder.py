"""Read a user's image folder (one sub-folder per class) into uint8 arrays of one shape.

Two layouts::

    root/<class>/<image>                  read_image_folder(root)
    root/{train,test[,validation]}/<class>/<image>
                                          read_image_folder_splits(root)

Class names are the sorted class-folder names; label ``i`` is ``class_names[i]``. Images
are decoded with Pillow (PNG, JPEG, BMP, GIF only), converted to the requested channels
and, given ``image_size``, resized, so the result can be stored as one TFDS ``Tensor``
feature (:func:`tlflax.data.tfds_store.write_image_dataset`).

Every refusal is a :class:`~tlflax.data.errors.DataError` naming the file or folder: an
unreadable, empty, non-image or oversized file, a link leading outside ``root``, an empty
class folder, fewer than two classes, a test class that train lacks. Data-quality problems
that a readable dataset can still have (imbalance, duplicates, leakage) are left to
validation (:mod:`tlflax.validation`).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tlflax.data.errors import DataError
from tlflax.data.local_files import find_splits, resolve_inside, visible_entries

IMAGE_SUFFIXES: tuple[str, ...] = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
# Decoders Pillow may use: without this list it would also try its ~40 other formats
# (PSD, EPS, ...) on whatever a folder holds.
_PILLOW_FORMATS: tuple[str, ...] = ("BMP", "GIF", "JPEG", "PNG")
# 8192 x 8192: below Pillow's own decompression-bomb limit (~89.5 M pixels), so an
# oversized image is refused here, by name, before Pillow warns or decodes anything.
DEFAULT_MAX_PIXELS = 8192 * 8192
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
# Transparent pixels are composited onto white, as a browser shows them on a blank page.
_BACKGROUND = (255, 255, 255, 255)

# split -> (images uint8 (N, H, W, C), labels int64 (N,))
ImageSplits = dict[str, tuple[np.ndarray, np.ndarray]]


def decode_image(
    source: Path | bytes,
    location: str | Path,
    *,
    image_size: int | None = None,
    channels: int = 3,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode one PNG, JPEG, BMP or GIF image into uint8 (H, W, ``channels``).

    Modes become ``channels`` as follows. For 3 channels: RGB stays; grayscale (``L``),
    bilevel (``1``) and 16-bit grayscale (scaled to 8 bits) are repeated into R, G and B;
    palette (``P``) is looked up; CMYK uses Pillow's plain conversion (no colour profile).
    For 1 channel: the same, then ITU-R 601-2 luma (``L = 0.299 R + 0.587 G + 0.114 B``).
    With an alpha channel (``RGBA``, ``LA``, ``PA``, palette transparency), transparent
    pixels are composited onto white first. EXIF orientation is applied; of a GIF
    animation only the first frame is read.

    Args:
        source: the image file, or its encoded bytes.
        location: what errors name (the file, or a record such as ``train[3]``).
        image_size: resize (bilinear, anti-aliased, aspect ratio not kept) to
            ``image_size`` x ``image_size``; None keeps the stored size.
        channels: 3 (RGB) or 1 (grayscale).
        max_pixels: largest width x height accepted, checked from the header before
            decoding (Pillow's own, higher limit stays in force too).

    Returns:
        The pixels, uint8 (H, W, channels).

    Raises:
        DataError: naming ``location`` when the input is empty, not one of the four
            formats, corrupt or truncated, larger than ``max_pixels``, or in an
            unsupported mode.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if (source.stat().st_size if isinstance(source, Path) else len(source)) == 0:
        raise DataError(location, "image file is empty (0 bytes)")
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    pixels = _read_pixels(
        stream, location, image_size=image_size, channels=channels, max_pixels=max_pixels
    )
    return pixels.reshape(*pixels.shape[:2], channels)


def _read_pixels(
    stream: Path | io.BytesIO,
    location: str | Path,
    *,
    image_size: int | None,
    channels: int,
    max_pixels: int,
) -> np.ndarray:
    """One image's pixels, opened, checked and converted as :func:`decode_image` documents.

    Pillow's errors become a :class:`DataError` naming ``location``.
    """
    try:
        with Image.open(stream, formats=_PILLOW_FORMATS) as image:
            _check_pixel_count(image, location, max_pixels)
            if image_size is not None:
                # JPEG can decode at 1/2, 1/4 or 1/8 scale directly: a large photo is not
                # decoded at full size only to be shrunk to a few hundred pixels.
                image.draft(None, (image_size, image_size))
            image = _to_mode(ImageOps.exif_transpose(image), location, channels)
            if image_size is not None and image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except DataError:
        raise
    except Image.DecompressionBombError as error:
        raise DataError(
            location, f"refused by Pillow's decompression-bomb guard: {error}"
        ) from None
    except UnidentifiedImageError:
        raise DataError(
            location, f"not a readable image (expected one of {', '.join(_PILLOW_FORMATS)})"
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        # Pillow reports truncated and corrupt data as OSError, some bad headers as
        # SyntaxError or ValueError.
        raise DataError(location, f"corrupt image: {error}") from None


def _check_pixel_count(image: Image.Image, location: str | Path, max_pixels: int) -> None:
    """Refuse an image over ``max_pixels``, from its header, before anything is decoded."""
    width, height = image.size
    if width * height > max_pixels:
        raise DataError(
            location,
            f"image is {width} x {height} = {width * height} pixels, over the limit "
            f"of {max_pixels} (a decompression-bomb guard)",
            "shrink the image, or raise max_pixels if it is genuine",
        )


def _to_mode(image: Image.Image, location: str | Path, channels: int) -> Image.Image:
    """``image`` converted to ``L`` or ``RGB`` as :func:`decode_image` documents."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own I -> L conversion clips at 255 instead of scaling.
        wide = np.asarray(image, dtype=np.int64).clip(0, 65535)
        image = Image.fromarray((wide >> 8).astype(np.uint8))
    if image.mode not in {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK"}:
        raise DataError(location, f"unsupported image mode {image.mode!r}")
    if image.mode in {"P", "PA"}:
        image = image.convert("RGBA")  # keeps palette transparency as alpha
    if "A" in image.getbands():
        background = Image.new("RGBA", image.size, _BACKGROUND)
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("L" if channels == 1 else "RGB")


def stack_images(images: Sequence[np.ndarray], locations: Sequence[str | Path]) -> np.ndarray:
    """Stack decoded images (at least one) into (N, H, W, C), refusing ones whose shape differs.

    Raises:
        DataError: naming the first image whose shape differs from the first one's.
    """
    for image, location in zip(images, locations, strict=True):
        if image.shape != images[0].shape:
            raise DataError(
                location,
                f"image is {image.shape} but {locations[0]} is {images[0].shape}",
                "set image_size so every image is resized to one shape",
            )
    return np.stack(images)


def _class_folders(folder: Path, root: Path) -> dict[str, Path]:
    """Class name -> resolved class folder, for each folder in ``folder``, sorted."""
    folders = {}
    for entry in visible_entries(folder):
        resolved = resolve_inside(entry, root)
        if not resolved.is_dir():
            raise DataError(entry, "is not a class folder", "put images in <class>/ sub-folders")
        folders[entry.name] = resolved
    if not folders:
        raise DataError(folder, "holds no class folders", "put images in <class>/ sub-folders")
    return folders


def _image_files(class_folder: Path, root: Path) -> list[Path]:
    """The images of a class folder, sorted by name and resolved inside ``root``."""
    files = []
    for entry in visible_entries(class_folder):
        resolved = resolve_inside(entry, root)
        if resolved.is_dir():
            raise DataError(entry, "nested folders are not read", "move its images up one level")
        if entry.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(entry, f"not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
        files.append(resolved)
    if not files:
        raise DataError(class_folder, "class folder is empty")
    return files


def _read_classes(
    folders: dict[str, Path],
    class_names: Sequence[str],
    root: Path,
    decode: Callable[[Path, Path], np.ndarray],
) -> tuple[list[np.ndarray], list[Path], np.ndarray]:
    """Decode every image of ``folders``; returns the images, their files and label ids."""
    images, files, labels = [], [], []
    for name, folder in folders.items():
        for path in _image_files(folder, root):
            images.append(decode(path, path))
            files.append(path)
            labels.append(class_names.index(name))
    return images, files, np.asarray(labels, dtype=np.int64)


def _check_class_count(class_names: Sequence[str], folder: Path) -> None:
    if len(class_names) < 2:
        raise DataError(
            folder,
            f"needs at least 2 class folders to classify, found {list(class_names)}",
        )


def read_image_folder(
    root: Path,
    *,
    image_size: int | None = None,
    channels: int = 3,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read ``root/<class>/<image>`` into arrays.

    Args:
        root: the dataset folder; nothing outside it is read (links leading out are refused).
        image_size: resize every image to ``image_size`` x ``image_size``; None requires
            every image to have the same size already.
        channels: 3 (RGB) or 1 (grayscale); see :func:`decode_image` for each mode.
        max_pixels: largest image accepted, in pixels (decompression-bomb guard).

    Returns:
        ``(images uint8 (N, H, W, channels), labels int64 (N,), class_names)``; classes in
        sorted order, files by name within each class. Hidden files are skipped.

    Raises:
        DataError: naming the file or folder at fault (see the module docstring).
    """
    if not root.is_dir():
        raise DataError(root, "dataset folder not found")
    folders = _class_folders(root, root)
    class_names = list(folders)
    _check_class_count(class_names, root)
    decode = functools.partial(
        decode_image, image_size=image_size, channels=channels, max_pixels=max_pixels
    )
    images, files, labels = _read_classes(folders, class_names, root, decode)
    return stack_images(images, files), labels, class_names


def read_image_folder_splits(
    root: Path,
    *,
    image_size: int | None = None,
    channels: int = 3,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[ImageSplits, list[str]]:
    """Read ``root/{train,test[,validation]}/<class>/<image>`` into arrays per split.

    The classes are train's class folders; another split may lack a class (validation
    reports that) but may not add one: its label would be unknown to the model.

    Args:
        root: holds ``train/`` and ``test/``, optionally ``validation/``, and nothing else.
        image_size, channels, max_pixels: as for :func:`read_image_folder`; with
            ``image_size`` None every image of every split must have one size.

    Returns:
        ``({split: (images uint8 (N, H, W, C), labels int64 (N,))}, class_names)``.

    Raises:
        DataError: naming the file or folder at fault, a missing or unknown split folder,
            or the class folder of another split that train does not have.
    """
    split_folders = find_splits(root)
    folders = {split: _class_folders(folder, root) for split, folder in split_folders.items()}
    class_names = list(folders["train"])
    _check_class_count(class_names, split_folders["train"])
    for split, classes in folders.items():
        unknown = [name for name in classes if name not in class_names]
        if unknown:
            raise DataError(
                classes[unknown[0]],
                f"class {unknown[0]!r} of split {split!r} is not a class of train "
                "(an unknown label)",
                f"train's classes are {class_names}",
            )
    decode = functools.partial(
        decode_image, image_size=image_size, channels=channels, max_pixels=max_pixels
    )
    decoded = {
        split: _read_classes(classes, class_names, root, decode)
        for split, classes in folders.items()
    }
    # One check over all splits: a TFDS image feature has one shape for every split.
    stack_images(
        [images[0] for images, _, _ in decoded.values()],
        [files[0] for _, files, _ in decoded.values()],
    )
    splits = {
        split: (stack_images(images, files), labels)
        for split, (images, files, labels) in decoded.items()
    }
    return splits, class_names
