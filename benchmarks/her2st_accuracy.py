"""Accuracy on real her2st sections: held-out patients first, paired statistics, same-feature baselines.

    python benchmarks/her2st_accuracy.py [--her2st ../shared/data/her2st] [--work DIR] [--seeds 0,1,2]
        [--protocols patient,within_patient] [--variants ...] [--folds patient-test-B] [--quick]
    python benchmarks/her2st_accuracy.py --merge A.json B.json   # one result from runs in several files

Protocols (benchmarks/accuracy/plan.py; every sample prepared by this script into WORK/ds):
  patient           headline. Leave-one-patient-out over the imaged patients: train C2-C6 -> test B4, and train
                    B4 -> test C2..C6. No test patient reaches training, the bank, gene selection, feature
                    standardisation or self-supervised pretraining (checked by plan.check_no_leak).
  patient-degraded  the C2-C6 models on a copy of B4 made here at ~3.4 um/px, re-coloured, black background
                    (written under WORK, never committed).
  within_patient    secondary, labelled "within-patient (same patient in training)": leave-one-section-out over
                    C2-C6.

Methods (benchmarks/accuracy/methods.py): CMRCNet, BLEEP and regression heads on a frozen SimCLR encoder (or a
frozen random one) with handcrafted features; the paper's recipe (paper ViT, 60 epochs) on C -> B4, seed 0;
"+bank" rows retrieve also from other patients' expression-only sections. Baselines on identical genes and
spots: mean, kNN on handcrafted features, kNN and ridge (HEST-Benchmark recipe) on the same frozen features.

Tuning: only k (retrieval and kNN), from a grid of 5-1600, by leave-one-training-section-out validation
(cmrcnet.inference.kchoice, the rule `cmrcnet train` uses). Aggregation and paired bootstrap CIs:
benchmarks/accuracy/stats.py.

Writes benchmarks/results/her2st_accuracy.json, _runs.json.xz (the rows and the summary) and .md (or *_quick.*
with --quick) after every fold, with the command, commit, machine and wall time.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy.main import main

if __name__ == "__main__":
    os.environ.setdefault("CMRCNET_CACHE", "/tmp/cmrcnet_feature_cache")
    sys.exit(main())
