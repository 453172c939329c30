"""What each benchmark method runs: trained variants (train_run with a fixed recipe) and same-feature baselines.

Every method of a fold predicts the same genes (the fold's panel, chosen on its training sections) on the same
test spots. Baselines read training spots only; their k (kNN) comes from `kchoice` on training spots only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cmrcnet.data.spots import SpotTable, resize_uint8
from cmrcnet.inference.kchoice import choose_k, euclidean_similarity, validation_groups
from cmrcnet.models.handcrafted import patch_features
from cmrcnet.models.preprocess import images_to_float

MARKERS = ["ERBB2", "ESR1", "PGR", "KRT19", "GRB7"]
FROZEN_EPOCHS = 20
FROZEN_LR = 5e-4  # heads-only training: a larger step than the end-to-end 1e-4 (fixed in advance, not tuned)
PRETRAIN = dict(n_tiles=2000, epochs=4)  # SimCLR per fold on the fold's training slides only


@dataclass(frozen=True)
class Variant:
    method: str  # cmrcnet | bleep | regression
    encoder: str  # "ssl" (SimCLR on the fold's training slides) | "random" (frozen random init) | "none"
    frozen: bool
    handcrafted: bool
    epochs: int
    preset: str = "cpu"
    lr: float | None = None  # None: the preset's
    only_fold: str | None = None  # run only in this fold (the paper recipe: C -> B4)
    only_seed: int | None = None
    note: str = ""
    train: tuple[tuple[str, float | str], ...] = ()  # TrainConfig fields set on top of the preset
    model: tuple[tuple[str, float | str], ...] = ()  # ModelConfig fields set on top of the preset
    fov_um: float | None = None  # patch field of view (prepare --fov-um); None: the default, 112 um
    # a variant that differs from another only in which saved weights predict (`PREDICTION_FIELDS`): the other's
    # complete run of the same fold and seed is copied and its bank and k built again from the selected weights
    # (runner.reused_run), instead of training the same model again; trained as usual when that run is absent
    reuse: str | None = None


# TrainConfig fields that change only which saved weights predict, not the training
PREDICTION_FIELDS = ("select", "use_ema")


SCANNER_AUG = (("stain_jitter", 0.3), ("scale_jitter", 8.0))  # other stains; slides down to ~4 um/px


VARIANTS: dict[str, Variant] = {
    "cmrcnet-ssl+hc": Variant("cmrcnet", "ssl", True, True, FROZEN_EPOCHS, lr=FROZEN_LR),
    "bleep-ssl+hc": Variant("bleep", "ssl", True, True, FROZEN_EPOCHS, lr=FROZEN_LR),
    "regression-ssl+hc": Variant("regression", "ssl", True, True, FROZEN_EPOCHS, lr=FROZEN_LR),
    "cmrcnet-rand+hc": Variant("cmrcnet", "random", True, True, FROZEN_EPOCHS, lr=FROZEN_LR),
    "bleep-rand+hc": Variant("bleep", "random", True, True, FROZEN_EPOCHS, lr=FROZEN_LR),
    "regression-rand+hc": Variant("regression", "random", True, True, FROZEN_EPOCHS, lr=FROZEN_LR),
    "cmrcnet-cpu30": Variant("cmrcnet", "none", False, False, 30,
                             note="the `cmrcnet train` default until 60 epochs replaced it: cpu ViT end to end, 30 epochs, "
                             "lr 1e-4"),
    "cmrcnet-cpu30-aug": Variant("cmrcnet", "none", False, False, 30, train=SCANNER_AUG,
                                 note="cmrcnet-cpu30 with stain jitter 0.3 and resolution jitter up to 8x"),
    "cmrcnet-cpu30-stainaug": Variant("cmrcnet", "none", False, False, 30, train=(("stain_jitter", 0.3),),
                                      note="ablation of cmrcnet-cpu30-aug: stain jitter 0.3 only"),
    "cmrcnet-cpu30-scaleaug": Variant("cmrcnet", "none", False, False, 30, train=(("scale_jitter", 8.0),),
                                      note="ablation of cmrcnet-cpu30-aug: resolution jitter up to 8x only"),
    "cmrcnet-mid30": Variant("cmrcnet", "none", False, False, 30, model=(("width", 384), ("heads", 6)),
                             note="cmrcnet-cpu30 with a wider ViT (width 384, 6 heads, depth 4; 2.25x the FLOPs)"),
    "cmrcnet-cpu30-trainstain": Variant("cmrcnet", "none", False, False, 30, train=(("stain_normalise", True),),
                                        note="cmrcnet-cpu30 trained on stain-normalised sections "
                                        "(`cmrcnet train --stain-normalise`)"),
    "cmrcnet-cpu60": Variant("cmrcnet", "none", False, False, 60,
                             note="today's `cmrcnet train` default: cmrcnet-cpu30 trained for 60 epochs (the 30-epoch "
                             "runs reached their lowest validation loss at epoch 29-30)"),
    "bleep-cpu60": Variant("bleep", "none", False, False, 60,
                           note="the default recipe (cmrcnet-cpu60) with BLEEP's objective: contrastive loss only, "
                           "no cross-modal reconstruction; same encoder, epochs and learning rate"),
    "cmrcnet-cpu60-ctx224": Variant("cmrcnet", "none", False, False, 60, fov_um=224.0,
                                    note="cmrcnet-cpu60 on patches of 224 um instead of 112 um: the spot and its "
                                    "surroundings, about 2x the spot (HiFusion's best neighbourhood)"),
    "bleep-cpu60-ctx224": Variant("bleep", "none", False, False, 60, fov_um=224.0,
                                  note="bleep-cpu60 on patches of 224 um (as cmrcnet-cpu60-ctx224)"),
    "cmrcnet-cpu60-ctx224-rw10": Variant("cmrcnet", "none", False, False, 60, fov_um=224.0,
                                         model=(("recon_weight", 10.0),),
                                         note="cmrcnet-cpu60-ctx224 with the cross-modal reconstruction term "
                                         "weighted 10x in the total loss (the term that separates CMRCNet from "
                                         "BLEEP; at weight 1 it falls to ~0.04 within a few epochs)"),
    "cmrcnet-cpu60-ctx224-rw3": Variant("cmrcnet", "none", False, False, 60, fov_um=224.0,
                                        model=(("recon_weight", 3.0),),
                                        note="cmrcnet-cpu60-ctx224 with the reconstruction term weighted 3x"),
    "cmrcnet-cpu60-ctx224-rw3-keep25": Variant("cmrcnet", "none", False, False, 60, fov_um=224.0,
                                               model=(("recon_weight", 3.0), ("mask_keep_prob", 0.25)),
                                               note="cmrcnet-cpu60-ctx224-rw3 keeping 25 % of the image-token "
                                               "elements in the reconstruction instead of 50 %: a harder "
                                               "reconstruction that must lean more on the expression tokens"),
    "cmrcnet-cpu60-ctx224-relrecon": Variant("cmrcnet", "none", False, False, 60, fov_um=224.0,
                                             model=(("recon_loss", "relative"),),
                                             note="cmrcnet-cpu60-ctx224 scoring the reconstruction by its error on "
                                             "the batch-centred embeddings relative to their spread (what tells "
                                             "spots apart) instead of the plain MSE, which the embedding's shared "
                                             "part dominates; weight 1"),
    "cmrcnet-cpu60-ctx224-rw3-last": Variant("cmrcnet", "none", False, False, 60, fov_um=224.0,
                                             model=(("recon_weight", 3.0),), train=(("select", "last"),),
                                             reuse="cmrcnet-cpu60-ctx224-rw3",
                                             note="cmrcnet-cpu60-ctx224-rw3 predicting with the last epoch's weights "
                                             "instead of those of the lowest validation loss (the same training)"),
    "bleep-cpu60-ctx224-last": Variant("bleep", "none", False, False, 60, fov_um=224.0,
                                       train=(("select", "last"),), reuse="bleep-cpu60-ctx224",
                                       note="bleep-cpu60-ctx224 predicting with the last epoch's weights (the same "
                                       "training)"),
    "cmrcnet-cpu60-ctx224-rw3-ema": Variant("cmrcnet", "none", False, False, 60, fov_um=224.0,
                                            model=(("recon_weight", 3.0),), train=(("use_ema", True),),
                                            reuse="cmrcnet-cpu60-ctx224-rw3",
                                            note="cmrcnet-cpu60-ctx224-rw3 predicting with the exponential moving "
                                            "average of the weights (decay 0.99 per step) at the epoch of the "
                                            "lowest validation loss (the same training)"),
    "bleep-cpu60-ctx224-ema": Variant("bleep", "none", False, False, 60, fov_um=224.0,
                                      train=(("use_ema", True),), reuse="bleep-cpu60-ctx224",
                                      note="bleep-cpu60-ctx224 predicting with the EMA weights (the same training)"),
    "cmrcnet-scratch-cpu12": Variant("cmrcnet", "none", False, False, 12,
                                     note="cpu ViT trained end to end for 12 epochs (NOT the paper's recipe)"),
    "cmrcnet-paper60": Variant("cmrcnet", "none", False, False, 60, preset="paper", only_fold="patient-test-B",
                               only_seed=0, note="the paper's recipe: paper ViT, 60 epochs, batch 64, lr 1e-4"),
    "bleep-paper60": Variant("bleep", "none", False, False, 60, preset="paper", only_fold="patient-test-B",
                             only_seed=0, note="the paper's recipe with the BLEEP objective"),
}
DEFAULT_VARIANTS = ("cmrcnet-ssl+hc", "bleep-ssl+hc", "regression-ssl+hc", "cmrcnet-rand+hc", "bleep-rand+hc",
                    "cmrcnet-paper60", "bleep-paper60")
# frozen feature sets that get a kNN and a ridge baseline: the encoder of these variants + handcrafted features
# (for the end-to-end default, cmrcnet-cpu60: its trained encoder's pooled tokens, from the seed the baselines use)
FEATURE_SETS = {"ssl+hc": "cmrcnet-ssl+hc", "rand+hc": "cmrcnet-rand+hc", "cpu60": "cmrcnet-cpu60"}


@torch.no_grad()
def frozen_features(model: torch.nn.Module, images: torch.Tensor, batch: int = 64) -> np.ndarray:
    """(N, width + 27): the frozen encoder's mean-pooled tokens and the model's standardised handcrafted
    features, exactly what the model's projection head reads (uint8 NHWC patches at the model's size)."""
    model.eval()
    size = model.config.img_size
    if images.shape[1] != size:
        images = resize_uint8(images.numpy(), size)
    out = []
    for i in range(0, len(images), batch):
        x = images_to_float(images[i:i + batch], layout="nhwc")
        pooled = model.encode_tokens(x).float().mean(dim=1)  # (b, width)
        feats = model.image_features(x)
        out.append(torch.cat([pooled, feats.float()], dim=1) if feats is not None else pooled)
    return torch.cat(out).numpy().astype(np.float64)


def handcrafted(table: SpotTable) -> np.ndarray:
    return patch_features(table.images).numpy().astype(np.float64)


def mean_prediction(train: SpotTable, n_test: int) -> np.ndarray:
    return np.repeat(train.expr.numpy().mean(0, keepdims=True), n_test, axis=0)


def knn_prediction(f_train: np.ndarray, f_test: np.ndarray, train: SpotTable) -> tuple[np.ndarray, dict]:
    """kNN on z-scored features (Euclidean); k chosen on the training spots (kchoice)."""
    expr = train.expr.numpy().astype(np.float64)
    groups, how = validation_groups(np.array(train.sample_ids), train.coords)
    k, scores = choose_k(euclidean_similarity(f_train), expr, groups)
    mu, sd = f_train.mean(0), f_train.std(0).clip(1e-6)
    a, b = (f_test - mu) / sd, (f_train - mu) / sd
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T  # (Q, N)
    idx = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return expr[idx].mean(axis=1), {"k": k, "k_scores": scores, "k_choice": how}


def ridge_prediction(f_train: np.ndarray, f_test: np.ndarray, train: SpotTable) -> tuple[np.ndarray, dict]:
    """HEST-Benchmark's probe: StandardScaler, PCA to 256 components (fewer when there are fewer spots or
    features), Ridge with alpha = 100 / (n_components * n_genes) (HEST `train_test_reg`). We fit an intercept
    (HEST does not); PCC is unaffected by a constant shift, MSE is then meaningful."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = train.expr.numpy().astype(np.float64)
    n_comp = int(min(256, f_train.shape[0] - 1, f_train.shape[1]))
    alpha = 100.0 / (n_comp * y.shape[1])
    probe = make_pipeline(StandardScaler(), PCA(n_components=n_comp, random_state=0), Ridge(alpha=alpha))
    probe.fit(f_train, y)
    return probe.predict(f_test), {"pca_components": n_comp, "alpha": alpha}
