"""The prepared dataset folder (HEST-1k compatible layout) that `cmrcnet prepare` writes and training reads.

    DATASET_DIR/
      st/<id>.h5ad          raw counts (spots x genes), obsm["spatial"] = spot centres in full-res pixels
      patches/<id>.h5       img (N,S,S,3) uint8, barcode (N,1) bytes, coords (N,2) int top-left corners
      metadata/<id>.json    pixel size, patient, technology, field of view, provenance
      images/<id>_thumb.png downscaled image for plots (scale in the metadata)

Expression-only samples (no image) have no patches file. Each sample's files carry the same random
`content_id`; a mismatch means an interrupted write and is reported instead of silently mixing versions.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
from PIL import Image

from cmrcnet import __version__
from cmrcnet.atomic import commit, discard, stage, write_json
from cmrcnet.constants import IMAGE_DIR, METADATA_DIR, PATCHES_DIR, SPATIAL_KEY, ST_DIR
from cmrcnet.data.hdf5 import probe_hdf5, write_h5ad
from cmrcnet.data.patches import PatchSet
from cmrcnet.data.sample import Sample, check_sparse
from cmrcnet.errors import InputFileError, require_dir

logger = logging.getLogger(__name__)

THUMBNAIL_MAX_PX = 1024
# HEST-1k stores the top-left corner of each patch in level-0 pixels; we follow it and keep centres in the h5ad.
COORDS_CONVENTION = "top_left_level0"


@dataclass
class SamplePatches:
    """Patches of one prepared sample as loaded into memory."""

    img: np.ndarray  # (N, S, S, 3) uint8
    barcodes: list[str]
    coords: np.ndarray  # (N, 2) int, top-left corners (x, y) in full-resolution pixels


def write_sample(root: str | Path, sample: Sample, patches: PatchSet | None, *, patch_px: int) -> dict:
    """Add (or atomically replace) one sample in a prepared dataset; return its metadata.

    Files are written to temporary names and renamed into place, metadata last; a failure before the renames
    leaves the dataset as it was.
    """
    root = Path(root)
    sid = sample.sample_id
    content_id = uuid.uuid4().hex
    counts = sample.counts.copy()
    if patches is not None:
        if list(patches.barcodes) != list(counts.obs_names):
            raise ValueError("patches and counts must list the same spots in the same order")
        counts.obs["patch_outside_fraction"] = patches.outside_fraction
    counts.uns["cmrcnet"] = {"content_id": content_id, "sample_id": sid, "cmrcnet_version": __version__}
    meta = {
        "sample_id": sid,
        "patient": sample.patient_id,
        "technology": sample.technology,
        "pixel_size_um": float(sample.pixel_size_um),
        "pixel_size_source": sample.pixel_size_source,
        "n_spots": int(counts.n_obs),
        "n_genes": int(counts.n_vars),
        "has_image": patches is not None,
        "fov_um": None if patches is None else patches.fov_um,
        "fov_px_fullres": None if patches is None else patches.fov_px,
        "patch_px": None if patches is None else int(patch_px),
        "n_padded_patches": 0 if patches is None else patches.n_padded,
        "coords_convention": COORDS_CONVENTION,
        "synthetic": sample.technology == "synthetic",
        "source": {k: str(v) for k, v in sample.source.items()},
        "content_id": content_id,
        "cmrcnet_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    staged: list[tuple[Path, Path]] = []  # (temporary, final) pairs, renamed together at the end
    try:
        st_final = root / ST_DIR / f"{sid}.h5ad"
        staged.append((stage(st_final, lambda p: write_h5ad(counts, p)), st_final))
        if patches is not None:
            h5_final = root / PATCHES_DIR / f"{sid}.h5"
            staged.append((stage(h5_final, lambda p: _write_patches_h5(p, patches, content_id)), h5_final))
            if sample.image is not None:
                thumb_final = root / IMAGE_DIR / f"{sid}_thumb.png"
                meta["thumbnail_scale"] = _thumbnail_scale(sample)
                staged.append((stage(thumb_final, lambda p: _write_thumbnail(p, sample)), thumb_final))
    except BaseException:
        discard(staged)
        raise
    commit(staged)
    if patches is None:  # a sample re-prepared without image must not keep stale patches
        (root / PATCHES_DIR / f"{sid}.h5").unlink(missing_ok=True)
    write_json(root / METADATA_DIR / f"{sid}.json", meta)
    return meta


def _write_patches_h5(path: Path, patches: PatchSet, content_id: str) -> None:
    n, s = len(patches.img), patches.img.shape[1]
    half = patches.fov_px / 2.0
    top_left = np.round(patches.centers - half).astype(np.int64)  # (N, 2)
    with h5py.File(path, "w") as f:
        f.create_dataset("img", data=patches.img, chunks=(1, s, s, 3) if n else None)
        f.create_dataset("barcode", data=np.array(patches.barcodes, dtype="S").reshape(-1, 1))  # (N, 1)
        f.create_dataset("coords", data=top_left)
        f.create_dataset("centers", data=patches.centers)
        f.attrs["content_id"] = content_id
        f.attrs["coords_convention"] = COORDS_CONVENTION
        f.attrs["fov_um"] = patches.fov_um
        f.attrs["fov_px_fullres"] = patches.fov_px


def _thumbnail_factor(sample: Sample) -> float:
    """Thumbnail pixels per stored-image pixel."""
    w, h = sample.image.size
    return min(1.0, THUMBNAIL_MAX_PX / max(h, w))


def _thumbnail_scale(sample: Sample) -> float:
    """Thumbnail pixels per full-resolution pixel."""
    return _thumbnail_factor(sample) * sample.image.scale


def _write_thumbnail(path: Path, sample: Sample) -> None:
    arr = sample.image.array()
    h, w = arr.shape[:2]
    f = _thumbnail_factor(sample)
    im = Image.fromarray(arr)
    if f < 1.0:
        im = im.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.BOX)
    im.save(path, format="PNG")


def same_fov(a: float, b: float) -> bool:
    """Whether two fields of view (um) are the same; the one tolerance used wherever patches are compared."""
    return abs(float(a) - float(b)) <= 1e-6 * max(abs(float(a)), abs(float(b)))


class PreparedDataset:
    """Read access to a prepared dataset folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = require_dir(root, "prepared dataset folder")
        if not (self.root / METADATA_DIR).is_dir():
            raise InputFileError(
                f"not a prepared dataset (no {METADATA_DIR}/ folder); create it with `cmrcnet prepare`",
                path=self.root,
            )

    def sample_ids(self) -> list[str]:
        return sorted(p.stem for p in (self.root / METADATA_DIR).glob("*.json") if not p.name.startswith("."))

    def require(self, sample_ids: list[str]) -> None:
        known = set(self.sample_ids())
        missing = [s for s in sample_ids if s not in known]
        if missing:
            raise InputFileError(
                f"samples {missing} are not in this dataset (it has: {sorted(known)})", path=self.root
            )

    def metadata(self, sample_id: str) -> dict:
        path = self.root / METADATA_DIR / f"{sample_id}.json"
        if not path.is_file():
            raise InputFileError(f"no metadata for sample {sample_id!r}", path=path)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputFileError(f"corrupt metadata JSON ({exc})", path=path) from exc

    def patient(self, sample_id: str) -> str:
        return str(self.metadata(sample_id).get("patient") or sample_id)

    def has_image(self, sample_id: str) -> bool:
        return bool(self.metadata(sample_id).get("has_image"))

    def counts_path(self, sample_id: str) -> Path:
        return self.root / ST_DIR / f"{sample_id}.h5ad"

    def patches_path(self, sample_id: str) -> Path:
        return self.root / PATCHES_DIR / f"{sample_id}.h5"

    def thumbnail(self, sample_id: str) -> tuple[np.ndarray, float] | None:
        """(thumbnail (h, w, 3) uint8, thumbnail px per full-res px), or None when there is none."""
        meta = self.metadata(sample_id)
        path = self.root / IMAGE_DIR / f"{sample_id}_thumb.png"
        if "thumbnail_scale" not in meta or not path.is_file():
            return None
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")), float(meta["thumbnail_scale"])

    def read_counts(self, sample_id: str) -> ad.AnnData:
        """Raw counts AnnData of one sample (spots x genes) with obsm["spatial"] centres."""
        meta = self.metadata(sample_id)
        path = self.counts_path(sample_id)
        if not path.is_file():
            raise InputFileError(f"counts of sample {sample_id!r} missing", path=path)
        probe_hdf5(path, "prepared counts file")
        try:
            adata = ad.read_h5ad(path)
        except Exception as exc:  # h5py/anndata raise OSError, KeyError, ValueError on corrupt files
            raise InputFileError(f"cannot read h5ad ({type(exc).__name__}: {exc})", path=path) from exc
        info = adata.uns.get("cmrcnet")
        stamp = info.get("content_id") if isinstance(info, dict) else None
        if stamp != meta.get("content_id"):
            raise InputFileError(
                f"counts do not match metadata/{sample_id}.json (interrupted prepare?); run prepare again",
                path=path,
            )
        if SPATIAL_KEY not in adata.obsm:
            raise InputFileError(f'no obsm["{SPATIAL_KEY}"]', path=path)
        check_sparse(adata.X, path=path)
        return adata

    def read_patches(self, sample_id: str) -> SamplePatches:
        """All patches of one sample, loaded into memory as uint8."""
        meta = self.metadata(sample_id)
        path = self.patches_path(sample_id)
        if not meta.get("has_image"):
            raise InputFileError(f"sample {sample_id!r} is expression-only (no image, no patches)", path=path)
        if not path.is_file():
            raise InputFileError(f"patches of sample {sample_id!r} missing", path=path)
        probe_hdf5(path, "prepared patch file")
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("content_id") != meta.get("content_id"):
                    raise InputFileError(
                        f"patches do not match metadata/{sample_id}.json (interrupted prepare?); run prepare again",
                        path=path,
                    )
                img = f["img"][...]
                barcodes = [b.decode() for b in np.asarray(f["barcode"]).reshape(-1)]
                coords = f["coords"][...]
        except InputFileError:
            raise
        except Exception as exc:
            raise InputFileError(f"cannot read patches h5 ({type(exc).__name__}: {exc})", path=path) from exc
        if img.ndim != 4 or img.shape[-1] != 3 or img.dtype != np.uint8 or len(img) != len(barcodes):
            raise InputFileError(f"unexpected patch array {img.shape} {img.dtype}", path=path)
        return SamplePatches(img, barcodes, coords)
