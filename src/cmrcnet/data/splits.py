"""Train/test splits over samples, grouped by patient, and seeded validation spots."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from cmrcnet.errors import ConfigError

logger = logging.getLogger(__name__)

SplitKind = Literal["leave-one-sample-out", "leave-one-patient-out", "kfold"]
SPLIT_KINDS: tuple[str, ...] = ("leave-one-sample-out", "leave-one-patient-out", "kfold")


@dataclass
class Fold:
    """One train/test split of samples."""

    name: str
    train: list[str]
    test: list[str]
    shared_patients: list[str]  # patients with samples on both sides (section-level split: optimistic)

    def to_dict(self) -> dict:
        return asdict(self)


def make_folds(
    sample_ids: Sequence[str],
    patients: Mapping[str, str],
    *,
    kind: SplitKind,
    k: int = 5,
    seed: int = 0,
) -> list[Fold]:
    """Split samples into folds.

    - leave-one-sample-out: each sample is a test fold; other samples of the same patient stay in training,
      which is flagged in `shared_patients` (EVALUATION.md: adjacent sections are near-copies).
    - leave-one-patient-out: all samples of one patient form a test fold.
    - kfold: patients are shuffled with `seed` and dealt into k groups; no patient is in two folds.
    """
    ids = list(dict.fromkeys(sample_ids))
    if len(ids) < 2:
        raise ConfigError(f"a split needs at least 2 samples, got {ids}")
    pat = {s: str(patients.get(s, s)) for s in ids}
    groups: dict[str, list[str]] = {}
    for s in ids:
        groups.setdefault(pat[s], []).append(s)
    if kind == "leave-one-sample-out":
        tests = [[s] for s in ids]
    elif kind == "leave-one-patient-out":
        if len(groups) < 2:
            raise ConfigError(f"leave-one-patient-out needs at least 2 patients, found {sorted(groups)}")
        tests = [groups[p] for p in sorted(groups)]
    elif kind == "kfold":
        if not 2 <= k <= len(groups):
            raise ConfigError(f"kfold needs 2 <= k <= number of patients ({len(groups)}), got k={k}")
        order = sorted(groups)
        np.random.default_rng(seed).shuffle(order)
        tests = [[s for p in order[i::k] for s in groups[p]] for i in range(k)]
    else:
        raise ConfigError(f"unknown split {kind!r}; choose from {', '.join(SPLIT_KINDS)}")
    folds = []
    for i, test in enumerate(tests):
        train = [s for s in ids if s not in test]
        shared = sorted({pat[s] for s in test} & {pat[s] for s in train})
        name = test[0] if len(test) == 1 else f"fold{i}"
        folds.append(Fold(name, train, list(test), shared))
    return folds


def describe_folds(folds: Sequence[Fold], patients: Mapping[str, str]) -> str:
    """Human-readable listing of folds with patient grouping, for printing."""
    lines = []
    for f in folds:
        tp = sorted({patients.get(s, s) for s in f.test})
        lines.append(f"{f.name}: test {f.test} (patients {tp}) | train {f.train}")
        if f.shared_patients:
            lines.append(
                f"  note: patients {f.shared_patients} have sections in train and test "
                "(section-level split; expect optimistic results)"
            )
    return "\n".join(lines)


def validation_spots(
    spots_by_sample: Mapping[str, Sequence[str]], *, fraction: float = 0.2, seed: int = 0
) -> dict[str, list[str]]:
    """A seeded `fraction` of each training sample's spots held out for validation, per sample."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"validation fraction must be in [0, 1), got {fraction}")
    out = {}
    for sid, spots in sorted(spots_by_sample.items()):
        # seeded per sample id, so a sample's validation spots do not depend on which other samples train
        rng = np.random.default_rng([seed, zlib.crc32(sid.encode("utf-8"))])
        n_val = round(fraction * len(spots))
        pick = rng.choice(len(spots), size=n_val, replace=False) if n_val else np.array([], dtype=int)
        out[sid] = [spots[j] for j in sorted(pick)]
    return out
