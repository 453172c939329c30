# %% [markdown]
# # cmrcnet from Python, end to end (SYNTHETIC data)
#
# Read samples, prepare a dataset, train, predict a held-out slide in memory, evaluate it, and predict a whole
# slide image. The data are the demo's **synthetic** slides (procedural tissue-like images whose gene programs
# follow visible morphology; not biological data). Run it as a script (`python docs/tutorial.py`) or cell by
# cell (`# %%` cells open as a notebook in VS Code and Jupytext). CI runs it with the tiny preset:
# `CMRCNET_TUTORIAL_CONFIG=tiny CMRCNET_TUTORIAL_EPOCHS=1 python docs/tutorial.py`.

# %%
import os
import tempfile
from pathlib import Path

import cmrcnet
from cmrcnet.data.synthetic import SyntheticConfig, sample_patients, write_synthetic_raw

CONFIG = os.environ.get("CMRCNET_TUTORIAL_CONFIG", "cpu")  # "cpu": the small ViT; "tiny" for smoke runs
EPOCHS = int(os.environ.get("CMRCNET_TUTORIAL_EPOCHS", "8"))
work = Path(os.environ.get("CMRCNET_TUTORIAL_DIR") or tempfile.mkdtemp(prefix="cmrcnet_tutorial_"))

# %% [markdown]
# ## 1. Read and prepare
# `cmrcnet.read` returns a `Sample` whose `counts` is an AnnData (spots x genes, raw counts,
# `obsm["spatial"]` in full-resolution pixels); `cmrcnet.prepare` cuts patches around every spot (112 um here; 224 um
# by default for legacy ST, whose spots lie 200 um apart) and adds the sample to a dataset folder.

# %%
synthetic = SyntheticConfig(n_slides=4, n_patients=2, seed=0)
write_synthetic_raw(work / "raw", synthetic)
for sample_id, patient in sample_patients(synthetic).items():
    sample = cmrcnet.read(
        "st",
        input=work / "raw",
        sample_id=sample_id,
        patient_id=patient,
        pixel_size_um=synthetic.pixel_size_um,
    )
    sample.technology = "synthetic"  # labels every output SYNTHETIC
    print(sample.sample_id, sample.counts.shape, f"{sample.pixel_size_um} um/px")
    cmrcnet.prepare(sample, work / "dataset", progress=False)

# %% [markdown]
# ## 2. Train
# Genes are chosen on the training slides only; the model's reference bank is built at the end. `precision`
# defaults to "auto" (bf16 only where this machine runs it faster than fp32).

# %%
model = cmrcnet.train(
    work / "dataset", ["synS1", "synS2", "synS3"], work / "run", config=CONFIG, epochs=EPOCHS, progress=False
)
print(model.method, len(model.genes), "genes; best epoch", model.training.best_epoch + 1)

# %% [markdown]
# ## 3. Predict the held-out slide, in memory
# The AnnData holds predicted log1p expression (`X`), `obs["sample_id"]`, `obs["barcode"]`,
# `obsm["spatial"]` and the provenance in `uns["cmrcnet"]`.

# %%
pred = model.predict(work / "dataset", ["synS4"], progress=False)
print(pred)
print({k: pred.uns["cmrcnet"][k] for k in ("method", "k", "precision", "bank_samples")})

# %% [markdown]
# ## 4. Evaluate
# Strict protocol: HEG-50 / HVG-50 are chosen on the training slides. `out=` would also write metrics.json,
# genes.csv, summary.md and maps.

# %%
metrics = cmrcnet.evaluate(pred, work / "dataset")
overall = metrics["overall"]
print(
    {
        key: round(overall[key]["mean"], 3)
        for key in ("pcc_heg50", "pcc_hvg50")
        if overall[key]["mean"] is not None
    }
)

# %% [markdown]
# ## 5. A whole slide image without expression
# Every tissue tile of the slide's field of view is predicted; maps go into the output folder.

# %%
tiles = model.predict_slide(
    work / "raw" / "images" / "synS4.png", work / "slide", pixel_size_um=1.0, progress=False
)
print(tiles.n_obs, "tiles;", sorted(p.name for p in (work / "slide").iterdir())[:4], "...")
print("tutorial finished in", work)
