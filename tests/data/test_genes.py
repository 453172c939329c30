import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from cmrcnet.data.genes import (
    GeneSelectionConfig,
    expression_matrix,
    normalize_log1p,
    normalized_dispersion,
    select_genes,
)
from cmrcnet.errors import ConfigError, InputFileError

from sample_factory import make_sample


def test_normalize_log1p_by_hand() -> None:
    a = ad.AnnData(sp.csr_matrix(np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32)))
    a.var_names = ["a", "b", "c"]
    out = normalize_log1p(a, ["b", "a"], target_sum=4.0)
    np.testing.assert_allclose(out[0], np.log1p([3.0, 1.0]), rtol=1e-6)  # library size 4 -> scale 1
    np.testing.assert_array_equal(out[1], [0.0, 0.0])  # empty spot stays zero


def test_dispersion_ranks_a_variable_gene_first() -> None:
    rng = np.random.default_rng(0)
    x = np.log1p(rng.poisson(5.0, size=(200, 5)).astype(float))
    x[:, 3] = np.log1p(rng.choice([0.0, 30.0], size=200))  # bimodal = overdispersed
    disp = normalized_dispersion(x, n_bins=1)
    assert int(np.nanargmax(disp)) == 3


def _samples() -> dict[str, ad.AnnData]:
    return {sid: make_sample(sid, seed=i, n_genes=40).counts for i, sid in enumerate(["a", "b", "c"])}


def test_strict_selection_never_reads_the_test_sample() -> None:
    samples = _samples()
    train = {k: samples[k] for k in ("a", "b")}
    cfg = GeneSelectionConfig(n_top=10, n_top_expressed=5, min_spot_fraction=0.0)
    first = select_genes(train, config=cfg, all_samples=samples)
    # perturb the held-out sample heavily: the strict gene list must not move
    rng = np.random.default_rng(1)
    samples["c"].X = sp.csr_matrix(rng.poisson(50.0, size=samples["c"].shape).astype(np.float32))
    second = select_genes(train, config=cfg, all_samples=samples)
    assert first.genes == second.genes and 10 <= len(first.genes) <= 15
    assert first.selected_on == ["a", "b"] and first.mode == "strict"


def test_paper_selection_reads_all_samples_and_says_so() -> None:
    samples = _samples()
    cfg = GeneSelectionConfig(mode="paper", per_sample_top=5, min_spot_fraction=0.0)
    before = select_genes({"a": samples["a"]}, config=cfg, all_samples=samples)
    assert before.mode == "paper" and before.selected_on == ["a", "b", "c"]
    rng = np.random.default_rng(3)
    x = samples["c"].X.toarray()
    x[:, :20] = rng.poisson(1.0, size=(x.shape[0], 20)) * rng.choice([0, 40], size=(x.shape[0], 20))
    samples["c"].X = sp.csr_matrix(x.astype(np.float32))
    after = select_genes({"a": samples["a"]}, config=cfg, all_samples=samples)
    assert before.genes != after.genes  # the test sample influences paper-mode genes
    with pytest.raises(ConfigError, match="all samples"):
        select_genes({"a": samples["a"]}, config=cfg)


def test_strict_genes_are_common_to_all_training_samples() -> None:
    samples = _samples()
    samples["b"] = samples["b"][:, 5:].copy()  # b lacks the first five genes
    genes = select_genes(samples, config=GeneSelectionConfig(n_top=100, min_spot_fraction=0.0)).genes
    assert not set(genes) & {f"G{i:03d}" for i in range(5)}


def test_missing_genes_error_or_fill() -> None:
    counts = make_sample("a").counts
    with pytest.raises(InputFileError, match="missing"):
        expression_matrix(counts, ["G000", "NOPE"])
    x, missing = expression_matrix(counts, ["G000", "NOPE", "G001"], allow_missing=True)
    assert missing == ["NOPE"] and x.shape == (counts.n_obs, 3)
    assert (x[:, 1] == 0).all() and (x[:, 0] > 0).all()


def test_bad_gene_config() -> None:
    with pytest.raises(ConfigError, match="mode"):
        GeneSelectionConfig(mode="loose").validate()  # type: ignore[arg-type]


def _renamed(a: ad.AnnData, names: dict[int, str]) -> ad.AnnData:
    a = a.copy()
    a.var_names = [names.get(i, g) for i, g in enumerate(a.var_names)]
    return a


def test_the_tumour_marker_panel_joins_the_genes_where_every_sample_measures_it(caplog) -> None:
    import logging

    from cmrcnet.data.markers import BREAST_TUMOUR_MARKERS

    # genes 0-5 renamed to the breast tumour markers in both samples; KRT19 (index 4) missing from sample b
    names = dict(enumerate(BREAST_TUMOUR_MARKERS))
    a = _renamed(make_sample("a", seed=0, n_genes=40).counts, names)
    b = _renamed(make_sample("b", seed=1, n_genes=40).counts, {k: v for k, v in names.items() if v != "KRT19"})
    cfg = GeneSelectionConfig(n_top=3, n_top_expressed=0, min_spot_fraction=0.0)
    with caplog.at_level(logging.INFO, logger="cmrcnet.data.genes"):
        chosen = select_genes({"a": a, "b": b}, config=cfg).genes
    expected = [g for g in BREAST_TUMOUR_MARKERS if g != "KRT19"]
    assert set(expected) <= set(chosen) and "KRT19" not in chosen
    assert len(chosen) <= 3 + len(expected)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # a missing marker is no warning
    cfg.tumour_markers = False
    plain = select_genes({"a": a, "b": b}, config=cfg).genes
    assert len(plain) == 3 and plain == chosen[:3]


def test_strict_panel_holds_the_highly_expressed_genes_of_the_training_spots() -> None:
    """HVG-N union HEG-M, both ranked over every detected gene: evaluation's HEG-50 is then inside the panel."""
    from cmrcnet.evaluation.metrics import top_expressed_genes

    samples = _samples()
    train = {k: samples[k] for k in ("a", "b")}
    cfg = GeneSelectionConfig(n_top=5, n_top_expressed=8, min_spot_fraction=0.0, tumour_markers=False)
    chosen = select_genes(train, config=cfg).genes
    hvg_only = select_genes(train, config=GeneSelectionConfig(
        n_top=5, n_top_expressed=0, min_spot_fraction=0.0, tumour_markers=False)).genes
    genes = list(train["a"].var_names)
    pooled = np.concatenate([normalize_log1p(a, genes) for a in train.values()])
    heg = top_expressed_genes(pooled, genes, n=8)
    assert chosen[:5] == hvg_only  # the HVG come first, in their order
    assert set(heg) <= set(chosen) and set(chosen) == set(hvg_only) | set(heg)
    assert len(chosen) == len(set(chosen))
    with pytest.raises(ConfigError, match="n_top_expressed"):
        GeneSelectionConfig(n_top_expressed=-1).validate()
