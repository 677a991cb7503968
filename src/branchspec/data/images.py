"""Labelled image data sets for classification (Sec. 6): CIFAR-10 from any of its usual forms, and digits.

Sources, all giving an :class:`ImageSet` (uint8 images ``[N, 3, S, S]``, int64 labels, class names):

- ``digits``: scikit-learn's bundled 8×8 digits (1,797 images, embedded, fast on a CPU); a fixed split of
  every fifth image (in a fixed shuffled order) into ``test``;
- the official python-pickle folder ``cifar-10-batches-py`` (``data_batch_1..5``, ``test_batch``,
  ``batches.meta``);
- an image tree ``ROOT/<split>/<class>/*.png|jpg|...`` (``split`` = train or test; ``val`` stands in for a
  missing ``test``);
- a tree with no test split: ``ROOT/train/<class>/*`` alone, or torchvision's ``ImageFolder`` layout
  ``ROOT/<class>/*``. A seeded share of each class (``holdout``, 10% by default) is then held out as the test
  split, the same files on every call (``ImageSet.origin`` says which);
- a ``.tar``/``.tar.gz``/``.tgz`` of such a tree (optionally inside one top folder). Members are read from the
  archive into memory, never written to disk, so no member can land outside it (absolute names, ``..``, links
  and devices are refused).

Every image is read by :func:`read_image`: grayscale, palette, RGBA (composited on white) and 16-bit images
become 8-bit RGB; non-square images are centre-cropped; images of another size are resized. A file that cannot
be decoded is counted in ``ImageSet.skipped`` and left out, with a warning; a class left with no image, a
missing folder, or a folder laid out otherwise is an error that says what was expected.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterable

import numpy as np
import torch
from torch import Tensor

from branchspec.errors import BranchspecError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
SPLITS = ("train", "test")
DIGITS = "digits"
HOLDOUT = 0.1  # the share of each class held out as the test split of a tree that has none


@dataclass
class ImageSet:
    """uint8 images ``[N, 3, S, S]``, labels int64 ``[N]``, class names, and the files that were skipped."""

    images: Tensor
    labels: Tensor
    classes: list[str]
    skipped: dict[str, int] = field(default_factory=dict)  # class -> unreadable files left out
    origin: str = ""  # where the split came from: its folder, or the held-out share of a tree without one

    def __post_init__(self):
        counts = torch.bincount(self.labels, minlength=len(self.classes)).tolist() if len(self.labels) else \
            [0] * len(self.classes)
        empty = [c for c, n in zip(self.classes, counts) if n == 0]
        if empty:
            raise BranchspecError(f"class(es) {empty} hold no readable image; add images or remove the class folder.")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def counts(self) -> dict[str, int]:
        return dict(zip(self.classes, torch.bincount(self.labels, minlength=len(self.classes)).tolist()))


# ------------------------------------------------------------------------------------------------ dispatch
def load_images(source: str | Path, split: str = "train", *, size: int | None = None, limit_per_class: int | None = None,
                holdout: float | None = HOLDOUT, seed: int = 0, show_progress: bool = True) -> ImageSet:
    """The ``split`` (train or test) of ``source``: ``"digits"``, a pickle folder, an image tree, or a tar of one.

    ``size`` resizes image-tree images (default: 32); ``limit_per_class`` keeps the first N images of each class
    (in file-name order), for quick runs on a subset. A tree without a test split gives ``holdout`` of each
    class's images, drawn from ``seed``, to ``test`` and the rest to ``train``; with ``holdout=None`` its train
    split is every image and asking for its test split is an error.
    """
    if split not in SPLITS:
        raise BranchspecError(f"split must be one of {SPLITS}, got {split!r}.")
    if limit_per_class is not None and limit_per_class < 1:
        raise BranchspecError(f"limit_per_class must be a positive integer, got {limit_per_class}.")
    if holdout is not None and not 0 < holdout < 1:
        raise BranchspecError(f"holdout must lie between 0 and 1 (a share of each class), got {holdout}.")
    if str(source) == DIGITS:
        data = load_digits(split)
    else:
        path = Path(source)
        if not path.exists():
            raise BranchspecError(f"data source {path} does not exist; give 'digits', a cifar-10-batches-py folder, "
                                  "an image tree ROOT/train/<class>/* (or ROOT/<class>/*), or a .tar(.gz) of one.")
        choice = _Choice(split, holdout, seed, limit_per_class)
        if path.is_file() and path.name.endswith(TAR_SUFFIXES):
            data = load_image_tar(path, split, size or 32, limit_per_class, show_progress, choice=choice)
        elif path.is_dir() and (path / "batches.meta").is_file():
            data = load_cifar_pickle(path, split)
        elif path.is_dir() and (path / "cifar-10-batches-py" / "batches.meta").is_file():
            data = load_cifar_pickle(path / "cifar-10-batches-py", split)
        elif path.is_dir():
            data = load_image_tree(path, split, size or 32, limit_per_class, show_progress, choice=choice)
        else:
            raise BranchspecError(f"{path} is neither a folder nor a .tar/.tar.gz archive; give an image tree, "
                                  "a cifar-10-batches-py folder or an archive of an image tree.")
    return _first_per_class(data, limit_per_class) if limit_per_class else data


@dataclass
class _Choice:
    """Which files of a tree's listing make the split: its own folder, or a held-out share of train."""

    split: str
    holdout: float | None = HOLDOUT  # None: no held-out split
    seed: int = 0
    limit: int | None = None

    def select(self, listing: dict[str, dict[str, list]], where: str) -> tuple[list[str], list[list], str]:
        """``listing``: split folder (or ``""`` for an ImageFolder tree) → class → items sorted by name. Returns
        the class names, the items of each class, and the origin of the split."""
        layout = "ROOT/train/<class>/* with ROOT/test/<class>/*, ROOT/train/<class>/* alone, or ROOT/<class>/*"
        if "train" in listing:
            base = "train"
            own = next((s for s in ((self.split,) if self.split == "train" else ("test", "val")) if s in listing), None)
            held_out = own is None or (self.split == "train" and not ({"test", "val"} & set(listing)))
        elif "" in listing:
            base, own, held_out = "", None, True
        else:
            raise BranchspecError(f"{where} holds no class folders; an image tree is laid out as {layout}.")
        if held_out and self.holdout is None:
            if self.split == "test":
                raise BranchspecError(f"{where} has no 'test' folder; an image tree with a test split is laid out "
                                      "as ROOT/train/<class>/* and ROOT/test/<class>/*.")
            held_out, own = False, base
        classes = sorted(listing[base])
        if len(classes) < 2:
            raise BranchspecError(f"{where} holds {len(classes)} class folder(s); an image tree needs one folder per "
                                  f"class (at least 2) with the images inside: {layout}.")
        if not held_out:
            found = sorted(listing[own])
            if found != classes:
                raise BranchspecError(f"{where}: the {own} split holds class folders {found} and the train split "
                                      f"{classes}; both splits need the same class folders.")
            return classes, [listing[own][c] for c in classes], f"{where}/{own}" if own else where
        items = [self._held_out(listing[base][c], label) for label, c in enumerate(classes)]
        share = f"{self.holdout:.0%}"
        return classes, items, (f"{where}{'/train' if base else ''}: {share} of each class held out as the test "
                                f"split (seed {self.seed}), this is the {self.split} part")

    def _held_out(self, items: list, label: int) -> list:
        n = len(items)
        n_test = max(1, round(self.holdout * n)) if n >= 2 else 0
        order = np.random.default_rng([int(self.seed), label, 0x401D]).permutation(n)
        chosen = order[:n_test] if self.split == "test" else order[n_test:]
        return [items[i] for i in sorted(chosen)]


def _first_per_class(data: ImageSet, limit: int) -> ImageSet:
    keep = torch.cat([torch.nonzero(data.labels == c).flatten()[:limit] for c in range(len(data.classes))]).sort().values
    return ImageSet(data.images[keep], data.labels[keep], data.classes, data.skipped, data.origin)


# ----------------------------------------------------------------------------------------- reading images
def read_image(source: str | Path | BinaryIO, size: int | None = None) -> np.ndarray | None:
    """One image as uint8 RGB ``[S, S, 3]``, or None when it cannot be decoded.

    Grayscale and palette images are expanded to RGB, transparency is composited on white, 16-bit and float
    images are rescaled to 8 bits over their range. A non-square image is centre-cropped to a square; with
    ``size`` it is resized to ``size × size``.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                a = np.asarray(im, dtype=np.float64)
                span = float(a.max() - a.min()) or 1.0
                im = Image.fromarray(np.round((a - a.min()) / span * 255).astype(np.uint8))
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
            im = im.convert("RGB")
            w, h = im.size
            if w != h:
                s = min(w, h)
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None


def _stack(images: list[np.ndarray], size: int) -> Tensor:
    if not images:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def _decode_all(items: Iterable[tuple[str, int, object]], total: int, classes: list[str], size: int,
                what: str, show_progress: bool) -> ImageSet:
    """Decode ``(name, label, source)`` items into an ImageSet, counting and skipping unreadable ones."""
    from tqdm.auto import tqdm

    images, labels, bad = [], [], Counter()
    for name, label, src in tqdm(items, total=total, desc=f"reading {what}", unit="img", disable=not show_progress,
                                 leave=False):
        image = read_image(src, size)
        if image is None:
            bad[classes[label]] += 1
            continue
        images.append(image)
        labels.append(label)
    if bad:
        warnings.warn(f"{sum(bad.values())} unreadable image(s) in {what} were skipped: {dict(bad)}", stacklevel=3)
    return ImageSet(_stack(images, size), torch.tensor(labels, dtype=torch.long), classes, dict(bad))


# -------------------------------------------------------------------------------------------- image trees
def load_image_tree(root: str | Path, split: str = "train", size: int = 32, limit_per_class: int | None = None,
                    show_progress: bool = True, *, choice: _Choice | None = None) -> ImageSet:
    """``root/<split>/<class>/*``, ``root/train/<class>/*`` alone or ``root/<class>/*`` (class names: the sorted
    class folders); the last two hold out a test split (:func:`load_images`)."""
    root = Path(root)
    choice = choice or _Choice(split)
    splits = [p for p in root.iterdir() if p.is_dir() and p.name in ("train", "test", "val")]
    folders = splits if any(p.name == "train" for p in splits) else [root]
    listing = {}
    for folder in folders:
        classes = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
        listing["" if folder == root else folder.name] = {
            c.name: [(str(p), p) for p in sorted(q for q in c.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)]
            for c in classes}
    if listing.get("") == {}:
        listing.pop("")
    classes, items, origin = choice.select(listing, str(root))
    files = [(name, label, src) for label, group in enumerate(items) for name, src in group[:limit_per_class]]
    data = _decode_all(files, len(files), classes, size, origin.split(":")[0], show_progress)
    data.origin = origin
    return data


# ----------------------------------------------------------------------------------------------- archives
def load_image_tar(archive: str | Path, split: str = "train", size: int = 32, limit_per_class: int | None = None,
                   show_progress: bool = True, *, choice: _Choice | None = None) -> ImageSet:
    """An image tree inside a tar archive, read in one streaming pass into memory (nothing is written to disk).

    The tree may sit inside top folders: a member ``…/<split>/<class>/<file>`` belongs to a split folder when
    the archive has a ``train`` folder, else ``…/<class>/<file>`` is an ImageFolder tree."""
    archive = Path(archive)
    choice = choice or _Choice(split)
    members: list[tuple[tuple[str, ...], bytes]] = []
    try:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                if not _safe_member(member, archive):
                    continue
                path = PurePosixPath(member.name)
                if len(path.parts) < 2 or path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                fh = tar.extractfile(member)
                members.append((path.parts, fh.read() if fh else b""))
    except (tarfile.TarError, EOFError, OSError) as err:
        raise BranchspecError(f"cannot read the archive {archive} ({err}); is it a complete .tar/.tar.gz?") from None
    split_layout = any(len(parts) >= 3 and parts[-3] == "train" for parts, _ in members)
    listing: dict[str, dict[str, list]] = {}
    for parts, data in members:
        if split_layout and len(parts) >= 3:
            group, cls = parts[-3], parts[-2]
        elif split_layout:
            continue
        else:
            group, cls = "", parts[-2]
        listing.setdefault(group, {}).setdefault(cls, []).append(("/".join(parts), data))
    listing = {g: {c: sorted(v) for c, v in cl.items()} for g, cl in listing.items()}
    classes, items, origin = choice.select(listing, archive.name)
    chosen = [(name, label, io.BytesIO(data)) for label, group in enumerate(items)
              for name, data in group[:limit_per_class]]
    out = _decode_all(chosen, len(chosen), classes, size, origin.split(":")[0], show_progress)
    out.origin = origin
    return out


def _safe_member(member: tarfile.TarInfo, archive: Path) -> bool:
    """Regular files with relative names inside the archive; anything that could escape is refused."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or member.name.startswith("\\") or ":" in member.name.split("/")[0]:
        raise BranchspecError(f"{archive} holds the unsafe member name {member.name!r} (outside the archive); "
                              "refusing to read it.")
    if member.issym() or member.islnk() or member.isdev():
        return False  # links and devices are never followed
    return member.isfile()


# ------------------------------------------------------------------------------------------- a user's folder
def read_folder(folder: str | Path, size: int) -> tuple[Tensor, list[str], int]:
    """Every image under ``folder`` (any size or mode, read by :func:`read_image`) as uint8 ``[N, 3, size,
    size]``, their paths relative to the folder, and the number of files that could not be decoded (skipped,
    with a warning). A missing or empty folder, or one with no readable image, is a one-line error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BranchspecError(f"image folder {folder} does not exist or is not a folder.")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BranchspecError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
    images, names = [], []
    for path in files:
        image = read_image(path, size)
        if image is not None:
            images.append(image)
            names.append(str(path.relative_to(folder)))
    skipped = len(files) - len(images)
    if not images:
        raise BranchspecError(f"none of the {len(files)} image files in {folder} could be read.")
    if skipped:
        warnings.warn(f"{skipped} of {len(files)} image files in {folder} could not be read and were skipped.",
                      stacklevel=2)
    return _stack(images, size), names, skipped


# ------------------------------------------------------------------------------------------ CIFAR pickles
def load_cifar_pickle(folder: str | Path, split: str = "train") -> ImageSet:
    """The official CIFAR-10 python version (``cifar-10-batches-py``)."""
    folder = Path(folder)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names + ["batches.meta"] if not (folder / n).is_file()]
    if missing:
        raise BranchspecError(f"{folder} lacks {missing}; a cifar-10-batches-py folder holds data_batch_1..5, "
                              "test_batch and batches.meta.")
    meta = _unpickle(folder / "batches.meta")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[b"label_names"]]
    images, labels = [], []
    for n in names:
        batch = _unpickle(folder / n)
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise BranchspecError(f"{folder / n} holds data of shape {data.shape}, not [N, 3072]; is it CIFAR-10?")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.extend(batch[b"labels"])
    return ImageSet(torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.long), classes)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh, encoding="bytes")  # noqa: S301 - the user's own data file
    except (pickle.UnpicklingError, EOFError, OSError) as err:
        raise BranchspecError(f"cannot read {path} ({err}); is it an intact CIFAR-10 python batch?") from None


# ------------------------------------------------------------------------------------------------ digits
def load_digits(split: str = "train") -> ImageSet:
    """scikit-learn's bundled 8×8 digits as 3-channel uint8 images; every fifth image (fixed order) is test."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    idx = order[order % 5 == 0] if split == "test" else order[order % 5 != 0]
    gray = np.round(d.images[idx] * (255 / 16)).astype(np.uint8)  # values 0..16
    images = torch.from_numpy(gray)[:, None].expand(-1, 3, -1, -1).contiguous()
    return ImageSet(images, torch.from_numpy(d.target[idx]).long(), [str(c) for c in range(10)])
