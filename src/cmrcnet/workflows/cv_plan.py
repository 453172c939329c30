"""Cross-validation plan: the CV_DIR layout, the options, the folds (folds.json) and the checks made before the
first training (same plan, same configuration, finished runs)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmrcnet.data.dataset import PreparedDataset
from cmrcnet.data.splits import SPLIT_KINDS, Fold, make_folds
from cmrcnet.errors import ConfigError, InputFileError
from cmrcnet.models.config import METHODS
from cmrcnet.run.config import RunConfig, load_run_config
from cmrcnet.run.layout import BANK_FILE, CONFIG_FILE, LAST_CKPT, RUN_FILE

FOLDS_FILE = "folds.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
RUN_SUBDIR = "run"  # inside <method>/seed<seed>/<fold>/
PRED_FILE = "pred.h5ad"
EVAL_SUBDIR = "eval"
TIMING_FILE = "timing.json"
SECTION_NOTE = (
    "section-level split: other sections of the same patient were in training; expect optimistic results"
)


@dataclass
class CvRun:
    """One (method, seed, fold) cell of the cross-validation and its folder."""

    method: str
    seed: int
    fold: Fold
    dir: Path  # CV_DIR/<method>/seed<seed>/<fold>

    @property
    def run_dir(self) -> Path:
        return self.dir / RUN_SUBDIR

    @property
    def pred_path(self) -> Path:
        return self.dir / PRED_FILE

    @property
    def eval_dir(self) -> Path:
        return self.dir / EVAL_SUBDIR

    @property
    def metrics_path(self) -> Path:
        return self.eval_dir / "metrics.json"

    @property
    def done(self) -> bool:
        return self.metrics_path.is_file()

    @property
    def label(self) -> str:
        return f"{self.method} seed {self.seed} fold {self.fold.name}"


# --- options ------------------------------------------------------------------------------------------------
def parse_methods(spec: str | Sequence[str]) -> list[str]:
    """Methods from "cmrcnet,bleep" or a list: validated and de-duplicated."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    methods = list(dict.fromkeys(m.strip() for m in items if m.strip()))
    if not methods:
        raise ConfigError("no method given; choose from " + ", ".join(METHODS))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    return methods


def parse_seeds(spec: str | Sequence[int]) -> list[int]:
    """Seeds from "0,1,2" or a list: non-negative integers, de-duplicated."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    seeds: list[int] = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"seeds must be integers, got {text!r}") from None
        if value < 0:
            raise ConfigError(f"seeds must be >= 0, got {value}")
        seeds.append(value)
    if not seeds:
        raise ConfigError("no seed given (e.g. seeds='0,1,2')")
    return list(dict.fromkeys(seeds))


def grouping(split: str, samples: list[str], patients: dict[str, str]) -> str:
    if split == "leave-one-sample-out":
        return "by sample (section-level: each sample is a test fold; its patient's other sections train)"
    if all(patients[s] == s for s in samples):
        return "by sample (no patient ids in the metadata: each sample counts as its own patient)"
    return "by patient (no patient is on both sides of a fold)"


def plan_folds(
    data_dir: str | Path,
    *,
    split: str,
    samples: Sequence[str] | None = None,
    k: int = 5,
    split_seed: int = 0,
) -> dict[str, Any]:
    """The cross-validation plan written to folds.json: samples, patients, grouping and folds.

    `samples` defaults to every sample of the dataset that has an image. Unknown samples, samples without
    image and impossible splits raise (before anything is trained).
    """
    if split not in SPLIT_KINDS:
        raise ConfigError(f"unknown split {split!r}; choose from {', '.join(SPLIT_KINDS)}")
    dataset = PreparedDataset(data_dir)
    if samples is None:
        ids = [s for s in dataset.sample_ids() if dataset.has_image(s)]
        if not ids:
            raise InputFileError("no sample with an image in this dataset", path=dataset.root)
    else:
        ids = sorted({str(s) for s in samples})  # sorted: the folds do not depend on the order given
        dataset.require(ids)
        no_image = [s for s in ids if not dataset.has_image(s)]
        if no_image:
            raise ConfigError(
                f"cross-validation samples need images; {no_image} are expression-only "
                "(leave them out of samples=)"
            )
    patients = {s: dataset.patient(s) for s in ids}
    folds = make_folds(ids, patients, kind=split, k=k, seed=split_seed)  # type: ignore[arg-type]
    return {
        "split": split,
        "k": k if split == "kfold" else None,
        "split_seed": split_seed,
        "grouping": grouping(split, ids, patients),
        "samples": ids,
        "patients": patients,
        "synthetic": any(bool(dataset.metadata(s).get("synthetic")) for s in ids),
        "data_dir": str(dataset.root.resolve()),
        "folds": [f.to_dict() for f in folds],
    }


def check_same_plan(path: Path, plan: dict[str, Any]) -> None:
    """A CV_DIR holds one cross-validation: refuse to mix folds of a different split into it."""
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputFileError(f"corrupt folds file ({exc})", path=path) from exc
    keys = ("split", "k", "split_seed", "samples", "folds")
    differ = [key for key in keys if old.get(key) != plan[key]]
    if differ:
        raise ConfigError(
            f"{path.parent} holds a different cross-validation ({', '.join(differ)} differ from the "
            "options given now); use the original options to resume it, or choose another out="
        )


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_saved_config(run: CvRun, cfg: RunConfig) -> None:
    """An existing run must have been started with the configuration asked for now (no mixed configs)."""
    path = run.run_dir / CONFIG_FILE
    if not path.is_file():
        return
    saved, wanted = _flatten(load_run_config(path, saved_run=True).to_dict()), _flatten(cfg.to_dict())
    differ = sorted(key for key in set(saved) | set(wanted) if saved.get(key) != wanted.get(key))
    if differ:
        raise ConfigError(
            f"{run.run_dir} was started with a different configuration ({', '.join(differ)}); use the "
            "original config= and epochs= to resume this cross-validation, or choose another out="
        )


def run_complete(run: CvRun) -> bool:
    """True when training finished (run.json status complete, last.pt and, for retrieval, bank.pt present)."""
    try:
        info = json.loads((run.run_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    if info.get("status") != "complete" or not (run.run_dir / LAST_CKPT).is_file():
        return False
    return run.method == "regression" or (run.run_dir / BANK_FILE).is_file()
