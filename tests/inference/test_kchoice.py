"""Retrieval k chosen by leave-one-training-section-out: the choice itself, and a run's k (``retrieval.k: auto``)
chosen when the bank is built, chosen again when it is extended, and used by prediction."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from inference_utils import bank_run

from cmrcnet.cli import main
from cmrcnet.data.prepare import prepare_sample
from cmrcnet.data.synthetic import SyntheticConfig, make_synthetic_samples
from cmrcnet.errors import ConfigError
from cmrcnet.inference import kchoice
from cmrcnet.inference.bank import load_bank
from cmrcnet.inference.predict import predict_samples
from cmrcnet.run.config import RunConfig, load_run_config
from cmrcnet.run.layout import CONFIDENCE_REFERENCE_FILE, CONFIG_FILE, K_CHOICE_FILE
from cmrcnet.run.load import load_trained_model


# ---------------------------------------------------------------------- the choice on arrays
def test_k_choice_prefers_few_neighbours_when_neighbours_are_exact() -> None:
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(300, 4))
    expr = np.concatenate([feats, feats**2], axis=1)  # expression is a function of the features
    groups = np.repeat(["s1", "s2", "s3"], 100)
    k, scores = kchoice.choose_k(kchoice.euclidean_similarity(feats), expr, groups, heg=np.arange(8))
    assert k <= 10 and scores[k] > scores[50] > scores[200]
    assert max(scores) == 200  # 400 and above clamped to the largest bank (two groups of 100)


def test_k_choice_ties_go_to_the_smaller_k() -> None:
    expr = np.random.default_rng(0).normal(size=(60, 3))
    sim = lambda q, b: np.zeros((len(q), len(b)))  # noqa: E731  every bank spot equally close
    k, _ = kchoice.choose_k(sim, expr, np.repeat(["a", "b"], 30), grid=(10, 20), heg=np.arange(3))
    assert k == 10


def test_a_single_training_section_is_validated_on_spatial_halves() -> None:
    coords = np.array([[0, 0], [1, 0], [2, 0], [3, 0]], dtype=float)
    groups, how = kchoice.validation_groups(np.array(["B4"] * 4), coords)
    assert "halves" in how and list(groups) == ["left", "left", "right", "right"]
    groups, how = kchoice.validation_groups(np.array(["C2", "C3", "C2", "C3"]), coords)
    assert how == "leave-one-training-section-out" and list(groups) == ["C2", "C3", "C2", "C3"]


def test_ranking_queries_in_chunks_changes_nothing() -> None:
    rng = np.random.default_rng(2)
    feats, extra = rng.normal(size=(90, 5)), rng.normal(size=(40, 6))
    expr = np.concatenate([feats, np.abs(feats[:, :1])], axis=1)
    sim = kchoice.euclidean_similarity(np.concatenate([feats, rng.normal(size=(40, 5))]))
    groups = np.repeat(["a", "b", "c"], 30)
    whole = kchoice.choose_k(sim, expr, groups, n_extra=40, extra_expr=extra, chunk=1000)
    pieces = kchoice.choose_k(sim, expr, groups, n_extra=40, extra_expr=extra, chunk=7)
    assert whole[0] == pieces[0]
    assert whole[1] == pytest.approx(pieces[1], abs=1e-12)
    assert max(whole[1]) == 60 + 40  # the other two groups and every extra spot can be retrieved


def test_extra_bank_spots_can_win_when_they_match_better() -> None:
    """Expression-only spots that match the queries better than the other training section pull k up."""
    rng = np.random.default_rng(3)
    expr = rng.normal(size=(60, 4))
    extra = np.repeat(expr[:30], 10, axis=0) + 0.01 * rng.normal(size=(300, 4))  # ten noisy copies of group a

    def sim(q: np.ndarray, b: np.ndarray) -> np.ndarray:  # each query is closest to its own copies
        own = np.zeros((len(q), len(b)))
        for i, qi in enumerate(q):
            own[i] = [10.0 if bi >= 60 and (bi - 60) // 10 == qi else 0.0 for bi in b]
        return own

    k, scores = kchoice.choose_k(sim, expr, np.repeat(["a", "b"], 30), n_extra=300,
                                 extra_expr=extra, grid=(5, 10, 50), heg=np.arange(4))
    assert k in (5, 10)  # only copies of a query's own spot (group a; group b has none: PCC 0 at every k)
    assert scores[k] > 0.45 and scores[k] > scores[50]  # group a near 1 from the extra spots alone


def test_config_k_is_auto_by_default_and_checked() -> None:
    cfg = RunConfig()
    assert cfg.retrieval.k == "auto"
    cfg.validate()
    for bad in ("sometimes", 0, -3, True, 2.5):
        cfg.retrieval.k = bad
        with pytest.raises(ConfigError, match="retrieval k"):
            cfg.validate()
    cfg.retrieval.k = 12
    cfg.validate()


# ---------------------------------------------------------------------- a run's k
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return bank_run(tmp_path_factory.mktemp("krun"))


def _choice(run: Path) -> dict:
    return json.loads((run / K_CHOICE_FILE).read_text())


def _reference(run: Path) -> dict:
    return json.loads((run / CONFIDENCE_REFERENCE_FILE).read_text())


def test_train_chooses_k_for_its_bank_and_predict_uses_it(trained: tuple[Path, Path], tmp_path: Path) -> None:
    ds, run = trained
    assert load_run_config(run / CONFIG_FILE).retrieval.k == "auto"  # the config keeps what was asked
    choice = _choice(run)
    bank = load_bank(run)
    assert choice["bank_samples"] == ["synS1", "synS2"] and choice["bank_spots"] == len(bank)
    assert choice["how"] == "leave-one-training-section-out" and choice["n_queries"] == len(bank)
    assert choice["k"] in {int(k) for k in choice["scores"]}
    assert max(int(k) for k in choice["scores"]) == len(bank) // 2  # one section retrieves from the other
    best = max(choice["scores"].values())
    assert choice["scores"][str(choice["k"])] == best
    pred = predict_samples(run, ds, ["synS3"], None, progress=False, smooth=0.0)
    assert pred.uns["cmrcnet"]["k"] == choice["k"]
    assert predict_samples(run, ds, ["synS3"], None, k=3, progress=False).uns["cmrcnet"]["k"] == 3


def test_bank_add_chooses_k_again_and_bank_build_restores_it(trained: tuple[Path, Path], tmp_path: Path) -> None:
    ds, run = trained
    first = _choice(run)
    assert main(["bank", "add", "--model", str(run), "--data", str(ds), "--samples", "exprOnly", "--quiet"]) == 0
    added = _choice(run)
    bank = load_bank(run)
    assert added["bank_samples"] == ["synS1", "synS2", "exprOnly"] and added["bank_spots"] == len(bank)
    # the expression-only spots are always retrievable: larger k become possible
    assert max(int(k) for k in added["scores"]) > max(int(k) for k in first["scores"])
    pred = predict_samples(run, ds, ["synS3"], None, progress=False, smooth=0.0)
    assert pred.uns["cmrcnet"]["k"] == added["k"] and "exprOnly" in pred.uns["cmrcnet"]["bank_samples"]
    # the confidence reference is measured again with the new bank and k, so predictions compare like with like
    per_sample = len(bank) // 3  # three samples of one grid
    assert _reference(run)["k"] == min(added["k"], 2 * per_sample)  # the other training sample + exprOnly
    assert _reference(run)["n"] > 0
    assert pred.uns["cmrcnet"]["confidence_reference"]["k"] == _reference(run)["k"]
    assert main(["bank", "build", "--model", str(run), "--data", str(ds), "--samples", "synS1,synS2",
                 "--quiet"]) == 0  # fmt: skip
    assert _choice(run) == first  # same bank, same embeddings: the same choice
    assert _reference(run)["k"] == min(first["k"], per_sample)  # the other training sample only


def test_a_fixed_k_is_kept_and_a_stale_choice_is_flagged(
    trained: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    _, run = trained
    tm = load_trained_model(run)
    bank = load_bank(run, tm)
    chosen = _choice(run)["k"]
    with caplog.at_level(logging.WARNING, logger="cmrcnet.inference.kchoice"):
        assert kchoice.resolve_k(tm, bank) == chosen and not caplog.records
        smaller = bank.select(np.array([key.startswith("synS1:") for key in bank.keys]))
        assert kchoice.resolve_k(tm, smaller) == chosen
    assert "was chosen for a bank of" in caplog.text
    tm.run_config.retrieval.k = 7  # a run whose config fixes k (e.g. runs made before "auto")
    assert kchoice.resolve_k(tm, bank) == 7 and kchoice.resolve_k(tm, bank, 4) == 4
    assert kchoice.update_run_k(tm, bank, None) == 7  # nothing chosen, nothing read


def test_a_run_without_a_choice_falls_back_to_50(
    trained: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, run = trained
    tm = load_trained_model(run)
    tm.run_dir = tmp_path  # a folder without retrieval_k.json
    with caplog.at_level(logging.WARNING, logger="cmrcnet.inference.kchoice"):
        assert kchoice.resolve_k(tm, None) == kchoice.FALLBACK_K == 50
    assert "no k was chosen" in caplog.text


def test_bank_add_from_another_dataset_folder_reads_the_training_patches_from_the_run(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    """Expression-only sections prepared into a folder of their own: k is still chosen, on the training
    patches of the dataset the run was trained on (run.json)."""
    ds, run = trained
    other = tmp_path / "expr_only_ds"
    expr_only = make_synthetic_samples(SyntheticConfig(n_slides=3, n_patients=1, n_rows=6, n_cols=6,
                                                       n_genes=30))[1]
    expr_only.sample_id, expr_only.image = "exprOther", None
    expr_only.counts.obs["sample_id"] = "exprOther"
    prepare_sample(expr_only, other, progress=False)
    assert main(["bank", "add", "--model", str(run), "--data", str(other), "--samples", "exprOther",
                 "--quiet"]) == 0  # fmt: skip
    assert "exprOther" in _choice(run)["bank_samples"]
    assert main(["bank", "build", "--model", str(run), "--data", str(ds), "--samples", "synS1,synS2",
                 "--quiet"]) == 0  # fmt: skip


def test_model_add_to_bank_extends_the_bank_and_chooses_k_again(trained: tuple[Path, Path]) -> None:
    import cmrcnet

    ds, run = trained
    model = cmrcnet.Model.load(run)
    first = _choice(run)
    k = model.add_to_bank(ds, ["exprOnly"], progress=False)
    assert model.bank.samples == ["synS1", "synS2", "exprOnly"] == load_bank(run).samples
    assert k == _choice(run)["k"] and _choice(run)["bank_spots"] == len(model.bank)
    assert model.predict(ds, ["synS3"], progress=False).uns["cmrcnet"]["k"] == k
    assert model.add_to_bank(ds, ["synS1", "synS2"], replace=True, progress=False) == first["k"]
    assert model.bank.samples == ["synS1", "synS2"] and _choice(run) == first


def test_when_k_cannot_be_chosen_training_falls_back_to_50_and_says_why(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _, run = trained
    tm = load_trained_model(run)
    bank = load_bank(run, tm)
    tm.run_dir = tmp_path

    def refuse(*args, **kwargs):
        raise ConfigError("too few training spots in the bank (4) to choose k")

    monkeypatch.setattr(kchoice, "choose_run_k", refuse)
    with pytest.raises(ConfigError, match="too few"):  # bank add keeps the last choice instead
        kchoice.update_run_k(tm, bank, None)
    assert not (tmp_path / K_CHOICE_FILE).exists()
    with caplog.at_level(logging.WARNING, logger="cmrcnet.inference.kchoice"):
        assert kchoice.update_run_k(tm, bank, None, fallback=True) == 50  # what train does
    assert "too few training spots" in caplog.text
    written = _choice(tmp_path)
    assert written["k"] == 50 and written["how"].startswith("not chosen (") and written["scores"] == {}
    assert kchoice.resolve_k(tm, bank) == 50
