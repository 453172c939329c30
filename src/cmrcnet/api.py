"""The Python API: the pipeline's steps as functions on folders and AnnData, for notebooks and scripts.

Everything here is re-exported from `cmrcnet` (``cmrcnet.train``, ``cmrcnet.Model``, ...), and the command line
calls these same functions::

    import cmrcnet

    sample = cmrcnet.read("st", input="her2st", sample_id="C2", patient_id="C")   # cmrcnet.data.Sample
    cmrcnet.prepare(sample, "datasets/her2st")                                   # adds it to a dataset folder
    model = cmrcnet.train("datasets/her2st", ["C3", "C4", "C5", "C6"], "runs/c2")  # a Model with its bank
    pred = model.predict("datasets/her2st", ["C2"])                              # AnnData, nothing written
    metrics = cmrcnet.evaluate(pred, "datasets/her2st")                          # dict; out=DIR writes reports
    tiles = model.predict_slide("C2.jpg", "c2_slide", pixel_size_um=0.69)        # AnnData of slide tiles

AnnData conventions of predictions (spots or slide tiles x genes): ``X`` holds predicted log1p(library-size
normalised) expression, ``obs["sample_id"]`` the sample, ``obs["barcode"]`` the spot (spot predictions),
``obsm["spatial"]`` centres (x, y) in full-resolution pixels, and ``uns["cmrcnet"]`` the provenance (run, weights,
bank samples, k, precision).

Names: an argument that is a trained run folder is called ``run_dir`` everywhere (`train`, `Model.load`,
`cmrcnet.inference.slide.predict_slide`, ...); ``model`` takes a loaded `Model` or its run folder. Errors name these
parameters (``pixel_size_um=``); the command line prints its flags instead (``--pixel-size``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmrcnet.constants import DEFAULT_SMOOTH
from cmrcnet.data.stain import DEFAULT_STAIN_RULE

if TYPE_CHECKING:
    import anndata as ad

    from cmrcnet.data.prepare import PrepareSummary
    from cmrcnet.data.sample import Sample
    from cmrcnet.inference.bank import Bank
    from cmrcnet.run.config import RunConfig
    from cmrcnet.run.load import TrainedModel
    from cmrcnet.training.trainer import TrainResult
    from cmrcnet.workflows.cv import CvResult

__all__ = ["Model", "cv", "evaluate", "predict", "predict_slide", "prepare", "read", "train"]


def read(fmt: str, **kwargs: Any) -> Sample:
    """Read one spatial-transcriptomics sample.

    Parameters
    ----------
    fmt
        "st" (legacy ST / her2st), "visium" (Space Ranger output), "hest" (HEST-1k) or "anndata" (any AnnData
        with ``obsm["spatial"]`` in full-resolution pixels).
    **kwargs
        ``input`` (the folder or .h5ad), ``sample_id``, ``patient_id``, ``pixel_size_um``, ``image`` and the
        format's own options (see `cmrcnet.data.readers.read_sample`).

    Returns
    -------
    Sample
        Raw counts as AnnData (``sample.counts``: spots x genes, ``obsm["spatial"]``), the H&E image, the pixel
        size and where it came from.
    """
    from cmrcnet.data.readers import read_sample

    return read_sample(fmt, **kwargs)


def prepare(
    sample: Sample,
    out: str | Path,
    *,
    fov_um: float | None = None,
    patch_px: int | None = None,
    progress: bool = True,
) -> PrepareSummary:
    """Cut fixed field-of-view patches around every spot and add the sample to a dataset folder.

    Parameters
    ----------
    sample
        What `read` returns.
    out
        The prepared dataset folder (HEST-compatible layout; created if needed). Preparing a sample again
        replaces it atomically.
    fov_um, patch_px
        Physical side of a patch (default: 224 um for legacy ST, 112 um otherwise; `data.prepare.default_fov_um`)
        and its side in pixels after resampling (default 224).

    Returns
    -------
    PrepareSummary
        Spots written, padded and dropped; ``summary.lines()`` describes it.
    """
    from cmrcnet.constants import DEFAULT_PATCH_PX
    from cmrcnet.data.prepare import prepare_sample

    return prepare_sample(
        sample,
        out,
        fov_um=fov_um,
        patch_px=DEFAULT_PATCH_PX if patch_px is None else patch_px,
        progress=progress,
    )


@dataclass
class Model:
    """A trained run loaded for prediction: the network, its genes and its reference bank.

    Attributes
    ----------
    run_dir
        The run folder it was loaded from.
    trained
        The network in eval mode with its configs (`cmrcnet.run.load.TrainedModel`).
    bank
        The reference bank retrieval predicts from (None for the regression method).
    """

    run_dir: Path
    trained: TrainedModel
    bank: Bank | None
    training: TrainResult | None = None  # set by `train`: best epoch, validation loss, per-epoch history

    @classmethod
    def load(
        cls,
        run_dir: str | Path,
        *,
        checkpoint: str | None = None,
        use_ema: bool | None = None,
        device: str = "cpu",
    ) -> Model:
        """Load a run folder written by `train` (``checkpoint``: "best.pt" or "last.pt", default the run's
        ``select`` setting; ``use_ema``: the EMA weights)."""
        from cmrcnet.inference.bank import load_bank
        from cmrcnet.run.load import load_trained_model

        trained = load_trained_model(run_dir, checkpoint=checkpoint, use_ema=use_ema, device=device)
        bank = None if trained.model_config.method == "regression" else load_bank(run_dir, trained)
        return cls(Path(run_dir), trained, bank)

    @property
    def genes(self) -> list[str]:
        """The genes the model predicts (columns of every prediction)."""
        return list(self.trained.genes)

    @property
    def method(self) -> str:
        """ "cmrcnet", "bleep" or "regression"."""
        return self.trained.model_config.method

    def predict(
        self,
        data: str | Path,
        samples: Sequence[str],
        *,
        out: str | Path | None = None,
        k: int | None = None,
        weighting: str | None = None,
        backend: str = "exact",
        batch_size: int = 128,
        precision: str = "auto",
        progress: bool = True,
        stain_normalise: bool | None = None,
        stain_rule: str = DEFAULT_STAIN_RULE,
        smooth: float = DEFAULT_SMOOTH,
    ) -> ad.AnnData:
        """Predict every spot of prepared `samples` (a sample never retrieves its own bank spots).

        Parameters
        ----------
        data
            Prepared dataset folder holding the samples' patches.
        samples
            Sample ids.
        out
            Also write the prediction to this .h5ad (atomically); None keeps it in memory only.
        k, weighting
            Neighbours averaged and "mean" or "similarity" weighting (default: the run's: k chosen when its
            bank was built (`cmrcnet.inference.kchoice`), mean).
        backend
            "exact" or "faiss" (``pip install "cmrcnet[faiss]"``).
        precision
            "auto" (measured per machine), "fp32", "bf16" or "fp16".
        stain_normalise
            Map each sample's colours onto the run's training patches first (slide level, `cmrcnet.data.stain`;
            for slides from another scanner or lab); recorded in ``uns["cmrcnet"]["stain_normalisation"]``. None
            (default): `cmrcnet.constants.DEFAULT_STAIN_NORMALISE`, skipped with a log line for runs made before
            stain references existed.
        stain_rule
            "contrast" (default: the spread of L*a*b* matched, the slide's lightness kept, its mean colour
            corrected only for a colour cast) or "reinhard" (means and spreads matched).
        smooth
            Average each spot's prediction with its neighbours' (weight of the neighbours' mean, 0-1;
            `cmrcnet.inference.smoothing`, predictions only, never measured expression). Default 0.5: it
            raised HEG-50 and marker PCC on held-out her2st patients (benchmarks/results/her2st_accuracy.md);
            0: none.

        Returns
        -------
        AnnData
            Spots x genes; writes ``X``, ``obs["sample_id"]``, ``obs["barcode"]``, ``obsm["spatial"]`` and
            ``uns["cmrcnet"]`` (module docstring). Retrieval methods also write the confidence of each spot,
            ``obs["retrieval_similarity"]`` (mean cosine similarity of its k bank neighbours) and
            ``obs["neighbour_spread"]`` (mean over genes of their expression std), and, when the run holds
            confidence_reference.json, ``uns["cmrcnet"]["confidence_reference"]`` and
            ``uns["cmrcnet"]["fraction_below_reference_p5"]`` (`cmrcnet.inference.confidence`).
        """
        from cmrcnet.inference.predict import predict_spots, resolve_stain_target

        return predict_spots(
            self.trained,
            self.bank,
            data,
            samples,
            out,
            k=k,
            weighting=weighting,
            backend=backend,
            batch_size=batch_size,
            precision=precision,
            progress=progress,
            stain_target=resolve_stain_target(self.trained, stain_normalise),
            stain_rule=stain_rule,
            smooth=smooth,
        )

    def predict_slide(self, slide: str | Path, out: str | Path, **options: Any) -> ad.AnnData:
        """Predict every tissue tile of an H&E slide; see `predict_slide` (the module function) for `options`."""
        return predict_slide(self.run_dir, slide, out, **options)

    def add_to_bank(
        self,
        data: str | Path,
        samples: Sequence[str],
        *,
        replace: bool = False,
        allow_missing_genes: bool = False,
        progress: bool = True,
    ) -> int | None:
        """Add measured `samples` (with or without an image, e.g. other patients' expression-only sections) to the
        run's reference bank on disk and to this Model, like ``cmrcnet bank add`` (``replace=True``: ``bank build``,
        the bank holds `samples` only). A run whose retrieval k is "auto" (the default) chooses k again for the new
        bank; returns the k predictions now use (None for the regression method or when k could not be chosen)."""
        from cmrcnet.workflows.bank import update_bank

        done = update_bank(self.trained, data, samples, action="build" if replace else "add",
                           allow_missing_genes=allow_missing_genes, progress=progress)  # fmt: skip
        self.bank = done.bank
        return done.k


def train(
    data: str | Path,
    train_samples: Sequence[str],
    run_dir: str | Path | None = None,
    *,
    config: str | Path | RunConfig = "cpu",
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
    **overrides: Any,
) -> Model:
    """Train a model on prepared samples, build its reference bank and return it ready to predict.

    Parameters
    ----------
    data
        Prepared dataset folder.
    train_samples
        Training sample ids (with images). Genes are chosen on them only; a seeded 20 % of their spots
        validate.
    run_dir
        The run folder to write (required): config.yaml, genes, checkpoints, metrics, run.json and bank.pt.
        Its former keyword ``out=`` still works, with a DeprecationWarning.
    config
        A preset ("cpu", "paper", "tiny"), a YAML file (a run's own config.yaml works) or a RunConfig.
    resume
        Continue the run in `run_dir` from its last.pt.
    **overrides
        Single fields: ``epochs``, ``batch_size``, ``lr``, ``seed``, ``precision``, ``stain_jitter``
        (random optical-density scale/shift per channel), ``scale_jitter`` (patches shrunk by up to this factor
        and resized back, as from coarser scanners), ``stain_normalise`` (map each training sample's colours
        onto the training samples' pooled statistics before training, as prediction maps a new slide's),
        ``stain_rule`` (its rule, "contrast" or "reinhard"; recorded in the run's config) (training), ``method``,
        ``recon_weight`` (factor on CMRCNet's cross-modal reconstruction term; 1 is the paper's),
        ``gene_mode`` ("strict"/"paper"), ``n_genes`` (highly variable genes), ``n_expressed_genes`` (highly
        expressed genes added, default 100), ``include_genes`` (list), ``tumour_markers`` (add the
        tumour marker panel the training samples measure; default True), ``encoder``,
        ``encoder_weights``, ``freeze_encoder``, ``handcrafted``, ``feature_cache``.

    Returns
    -------
    Model
        The trained run, loaded from `run_dir` with its bank; ``model.training`` holds the best epoch, its
        validation loss and the per-epoch history. Under torchrun, processes other than rank 0 get only
        ``run_dir`` and ``training``.
    """
    import copy

    from cmrcnet.run.config import RunConfig, load_run_config
    from cmrcnet.run.layout import one_run_dir
    from cmrcnet.training.distributed import dist_from_env
    from cmrcnet.workflows.train import train_run

    run_dir = one_run_dir(run_dir, overrides.pop("out", None), old_name="out", func="train")
    cfg = copy.deepcopy(config) if isinstance(config, RunConfig) else load_run_config(config)
    apply_overrides(cfg, **overrides)
    result = train_run(
        data_dir=data,
        train_samples=list(train_samples),
        run_dir=run_dir,
        config=cfg,
        device=device,
        resume=resume,
        progress=progress,
        command=command,
    )
    if dist_from_env().rank != 0:  # under torchrun only the first process loads the result
        return Model(run_dir, None, None, result)  # type: ignore[arg-type]
    model = Model.load(run_dir, device=device)
    model.training = result
    return model


TRAIN_FIELDS = ("epochs", "batch_size", "lr", "seed", "precision", "stain_jitter", "scale_jitter", "stain_normalise",
                "stain_rule")


def apply_overrides(cfg: RunConfig, **overrides: Any) -> RunConfig:
    """Set single fields of a RunConfig by name (None leaves a field as it is); see `train`."""
    from cmrcnet.errors import ConfigError

    given = {k: v for k, v in overrides.items() if v is not None}
    for name in TRAIN_FIELDS:
        if name in given:
            setattr(cfg.train, name, given.pop(name))
    if "method" in given:
        cfg.method = given.pop("method")
    if "gene_mode" in given:
        cfg.genes.mode = given.pop("gene_mode")
    if "n_genes" in given:
        cfg.genes.n_top = given.pop("n_genes")
    if "n_expressed_genes" in given:
        cfg.genes.n_top_expressed = given.pop("n_expressed_genes")
    if "include_genes" in given:
        cfg.genes.include = list(given.pop("include_genes"))
    if "tumour_markers" in given:
        cfg.genes.tumour_markers = bool(given.pop("tumour_markers"))
    encoder, weights = given.pop("encoder", None), given.pop("encoder_weights", None)
    if encoder or weights:
        from cmrcnet.training.pretrain import configure_encoder

        configure_encoder(cfg, encoder, weights)
    if "recon_weight" in given:
        cfg.model["recon_weight"] = given.pop("recon_weight")  # validate() refuses a non-number by name
    if given.pop("freeze_encoder", False):
        cfg.model["freeze_encoder"] = True
    if given.pop("handcrafted", False):
        cfg.model["handcrafted_features"] = True
    if "feature_cache" in given:
        cfg.train.feature_cache = str(given.pop("feature_cache"))
    if given:
        raise ConfigError(f"unknown training option(s) {sorted(given)}")
    cfg.validate()
    return cfg


def predict(
    model: str | Path | Model,
    data: str | Path,
    samples: Sequence[str],
    *,
    out: str | Path | None = None,
    device: str = "cpu",
    checkpoint: str | None = None,
    use_ema: bool | None = None,
    **options: Any,
) -> ad.AnnData:
    """Predict prepared samples with a run folder or a loaded `Model`; see `Model.predict` for `options`."""
    if not isinstance(model, Model):
        model = Model.load(model, checkpoint=checkpoint, use_ema=use_ema, device=device)
    return model.predict(data, samples, out=out, **options)


def predict_slide(
    model: str | Path | Model, slide: str | Path, out: str | Path, **options: Any
) -> ad.AnnData:
    """Predict every tissue tile of an H&E slide (WSI, TIFF, JPEG, PNG) and write maps into `out`.

    Parameters
    ----------
    model
        A run folder or a `Model`.
    slide
        The slide file.
    out
        Output folder: prediction.h5ad, thumbnail, tissue mask, heatmaps, tumour score, confidence map,
        summary.json (with a slide-level warning when most tiles look unlike the training sections), report.html.
    **options
        ``pixel_size_um`` (required without slide metadata), ``step_um``, ``genes``, ``markers``,
        ``threshold``, ``batch_size``, ``precision``, ``device``, ``k``, ``weighting``, ``sample_id``,
        ``min_tissue``, ``tissue`` (a `cmrcnet.data.tissue.TissueConfig`; ``TissueConfig(drop_non_tissue=False)``
        keeps legends, insets and pen ink as tissue), ``reader``, ``plots``, ``progress``, ``stain_normalise``,
        ``stain_rule`` ("contrast" or "reinhard"), ``smooth``
        (`cmrcnet.inference.slide.predict_slide`).

    Returns
    -------
    AnnData
        Tiles x genes: ``X`` predicted log1p expression, ``obsm["spatial"]`` tile centres in full-resolution
        pixels, ``obs["tissue_fraction"]``, ``obs["tumour_score"]`` when the markers are modelled,
        ``obs["retrieval_similarity"]`` and ``obs["neighbour_spread"]`` for retrieval methods, and
        ``uns["cmrcnet"]`` (slide, pixel size, grid, precision, confidence reference).
    """
    from cmrcnet.inference.slide import predict_slide as _predict_slide

    run_dir = model.run_dir if isinstance(model, Model) else model
    return _predict_slide(run_dir, slide, out, **options).adata


def evaluate(
    pred: str | Path | ad.AnnData,
    data: str | Path,
    out: str | Path | None = None,
    *,
    markers: Sequence[str] | None = None,
    protocol: str = "strict",
    plots: bool = True,
) -> dict[str, Any]:
    """Compare a prediction with the measured expression of its samples.

    Parameters
    ----------
    pred
        A prediction AnnData (`Model.predict`) or its .h5ad file; reads ``X``, ``obs["sample_id"]``,
        ``obs["barcode"]``, ``obsm["spatial"]`` and ``uns["cmrcnet"]``.
    data
        The prepared dataset with the measured counts (and, for the strict protocol, the training samples).
    out
        Folder for metrics.json, genes.csv, summary.md and maps; None writes nothing.
    markers
        Marker genes (default: the breast panel present in the prediction).
    protocol
        "strict" (gene sets chosen on the training samples) or "paper" (on each test sample; labelled).

    Returns
    -------
    dict
        The metrics: ``overall`` and ``per_sample`` PCC over HEG-50, HVG-50, markers and all genes, MSE, MAE,
        spot-wise PCC, gene-gene correlation preservation, excluded genes, leakage checks.
    """
    from cmrcnet.evaluation.evaluate import evaluate_predictions

    return evaluate_predictions(
        pred,
        data,
        out,
        markers=None if markers is None else list(markers),
        protocol=protocol,  # type: ignore[arg-type]
        plots=plots and out is not None,
    )


def cv(data: str | Path, out: str | Path, *, split: str, **options: Any) -> CvResult:
    """Cross-validation: for every method x seed x fold, train, predict the held-out samples and evaluate.

    Parameters
    ----------
    data
        Prepared dataset folder.
    out
        CV_DIR: folds.json, one folder per run, summary.json and summary.md. An interrupted run resumes.
    split
        "leave-one-sample-out", "leave-one-patient-out" or "kfold".
    **options
        ``methods``, ``config``, ``seeds``, ``samples``, ``k``, ``split_seed``, ``epochs``, ``precision``,
        ``markers``, ``protocol``, ``device``, ``plots``, ``progress``, ``smooth`` (default 0.5), ``stain_normalise``
        (`cmrcnet.workflows.cv.run_cv`).

    Returns
    -------
    CvResult
        ``summary`` (the dict written to summary.json) and ``out_dir``.
    """
    from cmrcnet.workflows.cv import run_cv

    return run_cv(data, out, split=split, **options)
