"""Names shared across the package: AnnData keys, prepared-dataset layout, technology geometry.

Defined once here so readers, writers and evaluation agree.
"""

from __future__ import annotations

# --- AnnData keys ---------------------------------------------------------------------------------------
SPATIAL_KEY = "spatial"  # obsm: (N, 2) spot centres in full-resolution pixels, columns (x=column, y=row)
SAMPLE_KEY = "sample_id"  # obs: sample (slide/section) id
PATIENT_KEY = "patient_id"  # obs: patient id
CMRCNET_UNS = "cmrcnet"  # uns: provenance written by this package

# --- prepared dataset layout (HEST-compatible) ----------------------------------------------------------
PATCHES_DIR = "patches"  # patches/<id>.h5 : img (N,S,S,3) uint8, barcode (N,1) bytes, coords (N,2) int
ST_DIR = "st"  # st/<id>.h5ad : raw counts, obsm["spatial"]
METADATA_DIR = "metadata"  # metadata/<id>.json : pixel size, patient, source, field of view
IMAGE_DIR = "images"  # optional thumbnails for plotting

# --- patch geometry defaults ---------------------------------------------------------------------------
DEFAULT_FOV_UM = 112.0  # HEST-1k: 224 px at 0.5 um/px; the default for Visium, HEST and other layouts
# Legacy ST (100 um spots, 200 um apart): patches of 224 um, the spot and its surroundings up to the neighbouring
# spots. On held-out her2st patients (benchmarks/results/her2st_accuracy.md, cmrcnet-cpu60-ctx224 against
# cmrcnet-cpu60, 3 seeds) they raised marker PCC over six sections (0.112 -> 0.138) and both HEG-50 and marker PCC
# on B4 at 3.4 um/px, re-coloured (0.108 / 0.248 -> 0.129 / 0.308); HEG-50 over six sections was 0.053 -> 0.043.
# Not measured on Visium, whose default stays at 112 um.
ST_FOV_UM = 224.0
DEFAULT_PATCH_PX = 224
PAD_VALUE = 255  # white, the colour of glass in brightfield H&E

# --- technology geometry (centre-to-centre pitch and spot diameter, micrometres) ------------------------
# Legacy ST: 100 um spots on a 200 um grid (Stahl et al., Science 2016). Visium: 55 um spots, 100 um pitch
# (10x Genomics technical note CG000239).
SPOT_PITCH_UM = {"st": 200.0, "visium": 100.0}
SPOT_DIAMETER_UM = {"st": 100.0, "visium": 55.0}

# --- prediction ---------------------------------------------------------------------------------------------
# Weight of the neighbours' mean in spatial smoothing (cmrcnet.inference.smoothing), the default of predict,
# predict-slide(s) and cv. On held-out her2st patients (benchmarks/results/her2st_accuracy.md) 0.5 raised the mean
# HEG-50 PCC of every method and baseline in every protocol (by +0.001 to +0.039) and the marker PCC of all but
# one; 0 turns it off.
DEFAULT_SMOOTH = 0.5

# Slide-level stain normalisation (cmrcnet.data.stain, by its default "contrast" rule: spreads matched, lightness
# kept, mean colour moved only for a colour cast) onto the run's training patches' colours before prediction, the
# default of predict, predict-slide(s) and cv where the run holds its stain reference (stain_reference.json; runs
# made before it existed predict without, with a log line). For the default `cmrcnet train` model (60 epochs) on
# held-out her2st patients (benchmarks/results/her2st_accuracy.md, rows cmrcnet-cpu60+smooth ->
# cmrcnet-cpu60+cstain+smooth, 3 seeds) it raised HEG-50 PCC over the six sections from 0.030 to 0.053, on B4 from
# 0.072 to 0.185 and on the B4 copy degraded to another scanner from 0.063 to 0.108. --no-stain-normalise turns it
# off.
DEFAULT_STAIN_NORMALISE = True

# `cmrcnet bank build|add` (cmrcnet.workflows.bank): start the bank from the given samples, or add them to it
BANK_ACTIONS = ("build", "add")
