"""The her2st accuracy benchmark's own logic on a few synthetic rows: aggregation, merging, paired CIs, k choice,
and the rule that no test patient reaches training, pretraining, the bank, the baselines or the k choice."""

from __future__ import annotations

import gzip
import json
import lzma
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from cmrcnet.data.spots import SpotTable

from accuracy import methods, plan, report, stats


def _row(test: str, method: str, seed, heg: float, genes=None, pcc=None, protocol: str = "patient") -> dict:
    return {"protocol": protocol, "test": test, "method": method, "seed": seed, "pcc_heg50": heg,
            "heg50_genes": genes or [], "heg50_pcc": pcc or []}


# ---------------------------------------------------------------------- aggregation
def test_seeds_are_averaged_within_each_section_before_sections() -> None:
    rows = [_row("C2", "cmrcnet-x", 0, 0.30), _row("C2", "cmrcnet-x", 1, 0.10),  # C2: mean 0.20 (2 seeds)
            _row("C3", "cmrcnet-x", 0, 0.40)]  # C3: 0.40 (1 seed)
    s = stats.summarise(rows)["patient"]["cmrcnet-x"]["pcc_heg50"]
    assert s["mean"] == pytest.approx(0.30)  # (0.20 + 0.40) / 2, not (0.3 + 0.1 + 0.4) / 3
    assert s["std"] == pytest.approx(np.std([0.20, 0.40], ddof=1))
    assert s["n_sections"] == 2 and s["per_section"] == pytest.approx({"C2": 0.20, "C3": 0.40})


def test_merge_counts_a_run_once_and_keeps_the_later_record() -> None:
    a = {"runs": [_row("B4", "knn-handcrafted", None, 0.1), _row("B4", "cmrcnet-x", 0, 0.2)]}
    b = {"runs": [_row("B4", "cmrcnet-x", 0, 0.25), _row("B4", "cmrcnet-x", 1, 0.3)]}
    runs = stats.merge_runs([a, b])
    assert len(runs) == 3
    assert {(r["method"], r["seed"]): r["pcc_heg50"] for r in runs}[("cmrcnet-x", 0)] == 0.25


def test_paired_difference_is_paired_by_gene_and_section() -> None:
    genes = [f"g{i}" for i in range(50)]
    rng = np.random.default_rng(0)
    rows = []
    for s in ("C2", "C3", "C4", "B4"):
        base = rng.uniform(0, 0.4, size=50)
        rows.append(_row(s, "knn-handcrafted", None, base.mean(), genes, base.tolist()))
        for seed in (0, 1, 2):  # always 0.05 ahead on every gene, whatever the gene's level
            better = base + 0.05 + rng.normal(0, 0.01, size=50)
            rows.append(_row(s, "cmrcnet-x", seed, better.mean(), genes, better.tolist()))
    cmp = stats.summarise(rows, n_boot=400)["patient"]["cmrcnet-x"]["vs"]["knn-handcrafted"]
    assert cmp["heg50_diff"] == pytest.approx(0.05, abs=0.01)
    lo, hi = cmp["heg50_ci95"]
    assert 0 < lo < 0.05 < hi  # paired: the between-gene spread (0 to 0.4) does not widen the CI
    assert cmp["sign_count"] == "4/4"
    # a baseline is compared with the other baselines too, never with itself
    assert "knn-handcrafted" not in stats.summarise(rows, n_boot=10)["patient"]["knn-handcrafted"]["vs"]


def test_markers_are_paired_per_section_with_no_ci_below_three_sections() -> None:
    rows = []
    for s, (m, b) in {"C2": (0.3, 0.1), "C3": (0.2, 0.1), "C4": (0.25, 0.2), "B4": (0.1, 0.2)}.items():
        rows += [{**_row(s, "cmrcnet-x", seed, 0.1, ["g"], [0.1]), "pcc_markers": m + 0.01 * (seed - 1)}
                 for seed in (0, 1, 2)]
        rows.append({**_row(s, "knn-handcrafted", None, 0.1, ["g"], [0.1]), "pcc_markers": b})
    cmp = stats.summarise(rows, n_boot=500)["patient"]["cmrcnet-x"]["vs"]["knn-handcrafted"]
    assert cmp["markers_diff"] == pytest.approx((0.2 + 0.1 + 0.05 - 0.1) / 4)  # seeds averaged per section
    assert cmp["markers_sign_count"] == "3/4"
    lo, hi = cmp["markers_ci95"]
    assert -0.1 <= lo < cmp["markers_diff"] < hi <= 0.2
    two = [r for r in rows if r["test"] in ("C2", "C3")]
    assert stats.summarise(two, n_boot=50)["patient"]["cmrcnet-x"]["vs"]["knn-handcrafted"]["markers_ci95"] is None


def test_methods_are_paired_with_like_for_like_baselines_only() -> None:
    assert stats.comparable("cmrcnet-ssl+hc+bank+smooth", "knn-ssl+hc+smooth")
    assert not stats.comparable("cmrcnet-ssl+hc+bank+smooth", "knn-ssl+hc")  # smoothing on one side only
    assert stats.comparable("cmrcnet-ssl+hc+bank", "bleep-ssl+hc+bank")
    assert not stats.comparable("cmrcnet-ssl+hc+bank", "bleep-ssl+hc")
    assert stats.comparable("cmrcnet-ssl+hc+bank-ens", "regression-ssl+hc-ens")
    assert not stats.comparable("cmrcnet-ssl+hc", "regression-ssl+hc-ens")
    assert not stats.comparable("cmrcnet-ssl+hc+stain", "knn-handcrafted")


def test_variants_train_at_the_papers_reconstruction_weight_unless_they_name_one(tmp_path: Path) -> None:
    """The cpu preset's weight is 3; rows of variants that name none were measured at 1 and must stay so."""
    from accuracy import runner

    assert runner.run_config("cmrcnet-cpu60-ctx224", 0, False, None, tmp_path).model["recon_weight"] == 1.0
    assert runner.run_config("cmrcnet-cpu60-ctx224-rw3", 0, False, None, tmp_path).model["recon_weight"] == 3.0
    assert runner.run_config("cmrcnet-cpu60-ctx224-rw10", 0, False, None, tmp_path).model["recon_weight"] == 10.0
    keep = runner.run_config("cmrcnet-cpu60-ctx224-rw3-keep25", 0, False, None, tmp_path).model
    assert (keep["recon_weight"], keep["mask_keep_prob"]) == (3.0, 0.25)
    rel = runner.run_config("cmrcnet-cpu60-ctx224-relrecon", 0, False, None, tmp_path).model
    assert (rel["recon_weight"], rel["recon_loss"]) == (1.0, "relative")


def test_the_bleep_peer_of_a_reconstruction_weight_variant_is_bleep_with_the_same_recipe() -> None:
    """BLEEP has no reconstruction term, so `cmrcnet-X-rw10` is compared with `bleep-X` (same modifiers)."""
    table = {m: {} for m in ("bleep-cpu60-ctx224+cstain+smooth", "bleep-cpu60-ctx224", "knn-handcrafted")}
    assert report.peer("cmrcnet-cpu60-ctx224-rw10+cstain+smooth", "bleep", table) == "bleep-cpu60-ctx224+cstain+smooth"
    assert report.peer("cmrcnet-cpu60-ctx224-rw3", "bleep", table) == "bleep-cpu60-ctx224"
    assert report.peer("cmrcnet-cpu60-ctx224-rw3-keep25+cstain+smooth", "bleep", table) == \
        "bleep-cpu60-ctx224+cstain+smooth"
    assert report.peer("cmrcnet-cpu60-ctx224-relrecon", "bleep", table) == "bleep-cpu60-ctx224"
    # the checkpoint choice is kept: the default predicting with its last weights against BLEEP's last weights
    last = {m: {} for m in ("bleep-cpu60-ctx224-last+cstain+smooth", "bleep-cpu60-ctx224+cstain+smooth")}
    assert report.peer("cmrcnet-cpu60-ctx224-rw3-last+cstain+smooth", "bleep", last) == \
        "bleep-cpu60-ctx224-last+cstain+smooth"
    assert report.peer("cmrcnet-cpu60-ctx224-rw3-ema", "bleep", {"bleep-cpu60-ctx224-ema": {}}) == \
        "bleep-cpu60-ctx224-ema"
    assert report.peer("cmrcnet-cpu60-ctx224-rw10+smooth", "bleep", table) is None  # other modifiers: no peer
    assert report.peer("cmrcnet-cpu60-ctx224-rw10", "knn", table) is None  # kNN/ridge keep the model's own features


def test_genes_constant_in_the_data_are_left_out_of_the_pairs() -> None:
    rows = [_row("B4", "cmrcnet-x", 0, 0.5, ["a", "b"], [0.5, None]),
            _row("B4", "mean", None, 0.0, ["a", "b"], [0.0, None])]
    cmp = stats.paired_difference(rows[:1], rows[1:], n_boot=50)
    assert cmp["heg50_diff"] == pytest.approx(0.5) and cmp["heg50_ci95"] == pytest.approx([0.5, 0.5])


def test_report_puts_the_patient_table_first_and_labels_within_patient() -> None:
    rows = [_row("C2", "cmrcnet-x", 0, 0.3, protocol="within_patient"), _row("B4", "cmrcnet-x", 0, 0.2)]
    rec = {"quick": False, "complete": True, "command": "x", "commit": "abc", "machine": {"cpu": "cpu", "torch": "t"},
           "wall_seconds": 1.0, "markers": ["ERBB2"], "k_grid": [5], "runs": rows,
           "summary": stats.summarise(rows)}
    md = report.markdown(rec)
    assert md.index("Held-out patient") < md.index("within-patient (same patient in training)")


def _record(runs: list[dict], *, device: str = "cpu", gpu=None, seeds=(0,)) -> dict:
    return {"benchmark": "her2st_accuracy", "quick": False, "complete": True, "command": f"run on {device}",
            "commit": "abc", "machine": {"cpu": "cpu", "cpu_line": f"cpu of the {device} part", "torch": "t"},
            "device": device, "gpu": gpu, "wall_seconds": 60.0, "markers": ["ERBB2"], "k_grid": [5],
            "seeds": list(seeds), "encoders": {}, "variants": {}, "runs": runs}


def test_a_merged_result_says_where_each_part_ran(tmp_path: Path) -> None:
    from accuracy import main as bench_main
    from accuracy import results

    cpu = _record([{**_row("B4", "cmrcnet-x", 0, 0.2), "train_seconds": 4000.0},
                   _row("B4", "knn-handcrafted", None, 0.1)])
    gpu = _record([{**_row("B4", "bleep-y", 0, 0.3), "train_seconds": 40.0, "train_device": "cuda"},
                   {**_row("B4", "bleep-y", 0, 0.3, protocol="patient-degraded"), "train_seconds": 40.0,
                    "train_device": "cuda"},
                   {**_row("B4", "bleep-y+bank", 0, 0.35), "train_seconds": 40.0, "train_device": "cuda"}],
                  device="cuda", gpu="NVIDIA H200", seeds=(1,))
    gpu["variants"] = {"bleep-y": {}}
    cpu["variants"] = {"cmrcnet-x": {}}
    cpu["machine"] |= {"cpu_flags": {"avx2": True, "amx_tile": False}, "torch_cpu_capability": "AVX2"}
    results.write_record(tmp_path / "cpu", cpu)
    results.write_record(tmp_path / "gpu", gpu)
    assert bench_main.main(["--merge", str(tmp_path / "cpu.json"), str(tmp_path / "gpu.json"),
                            "--out", str(tmp_path / "merged")]) == 0
    rec = results.read_record(tmp_path / "merged.json")
    # the summary (quadratic in the methods) lives in the compressed sidecar and reads back with the record
    assert "summary" not in json.loads((tmp_path / "merged.json").read_text())
    assert rec["summary"]["patient"]["cmrcnet-x"]["pcc_heg50"]["mean"] == pytest.approx(0.2)
    assert [(p["device"], p["gpu"]) for p in rec["parts"]] == [("cpu", None), ("cuda", "NVIDIA H200")]
    assert rec["parts"][1]["variants"] == ["bleep-y"] and rec["seeds"] == [0, 1]
    md = (tmp_path / "merged.md").read_text()
    assert "| bleep-y | cuda | 1 | 40 |" in md and "| cmrcnet-x | cpu | 1 | 4000 |" in md
    assert "GPU NVIDIA H200" in md
    with lzma.open(tmp_path / "merged_runs.json.xz", "rt") as f:  # the sidecar says where its rows were measured
        sidecar = json.load(f)
    assert [p["cpu"] for p in sidecar["parts"]] == ["cpu of the cpu part", "cpu of the cuda part"]
    assert sidecar["parts"][0]["cpu_flags"] == {"avx2": True, "amx_tile": False}  # as its machine recorded them
    assert sidecar["parts"][0]["torch_cpu_capability"] == "AVX2" and "cpu_flags" not in sidecar["parts"][1]
    cpu_of = {(r["method"], r["protocol"]): r["cpu"] for r in sidecar["runs"]}  # and each row its own CPU
    assert cpu_of[("cmrcnet-x", "patient")] == cpu_of[("knn-handcrafted", "patient")] == "cpu of the cpu part"
    assert cpu_of[("bleep-y+bank", "patient")] == "cpu of the cuda part"
    with gzip.open(tmp_path / "old_runs.json.gz", "wt") as f:  # an older sidecar held the rows alone
        json.dump(cpu["runs"], f)
    (tmp_path / "old.json").write_text(json.dumps({"runs_file": "old_runs.json.gz"}))
    assert results.read_record(tmp_path / "old.json")["runs"] == cpu["runs"]


def test_rows_of_a_merged_record_get_the_cpu_of_the_parts_that_ran_them() -> None:
    intel = "Intel Xeon; avx2 avx512f amx_tile; torch 2.13.0+cpu capability AVX512; {} threads"
    amd = "AMD EPYC; avx2; torch 2.13.0+cpu capability AVX2; 2 threads"
    parts = [{"cpu": intel.format(1), "variants": ["cmrcnet-a"]}, {"cpu": intel.format(2), "variants": ["bleep-b"]}]
    assert stats.row_cpu(parts, "cmrcnet-a+bank+stain+smooth") == intel.format(1)
    # a baseline ran in every part: the CPU they share, without the threads
    assert stats.row_cpu(parts, "knn-handcrafted") == "Intel Xeon; avx2 avx512f amx_tile; torch capability AVX512"
    assert stats.row_cpu([*parts, {"cpu": amd, "variants": ["cmrcnet-c"]}], "mean") is None  # two CPUs: unknown
    assert stats.row_cpu([{"cpu": None, "variants": []}], "mean") is None


def test_a_cpu_line_reads_back_into_flags_and_torch_capability() -> None:
    from cmrcnet.runtime import cpu_line

    desc = {"cpu": "AMD EPYC", "flags": {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_bf16": False,
                                         "amx_tile": False}, "torch": "2.13.0+cpu", "torch_cpu_capability": "AVX512",
            "threads": 2}
    assert stats.cpu_record(cpu_line(desc)) == {"cpu_flags": desc["flags"], "torch_cpu_capability": "AVX512"}
    none = {**desc, "flags": dict.fromkeys(desc["flags"], False), "torch_cpu_capability": "DEFAULT"}
    assert stats.cpu_record(cpu_line(none)) == {"cpu_flags": none["flags"], "torch_cpu_capability": "DEFAULT"}
    assert stats.cpu_record("cpu of the cpu part") == {} and stats.cpu_record(None) == {}


def test_every_written_row_carries_the_cpu_flags_and_torch_capability_it_ran_with(tmp_path: Path) -> None:
    from cmrcnet.runtime import cpu_line

    from accuracy import results

    amd = {"cpu": "AMD EPYC", "flags": {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_bf16": False,
                                        "amx_tile": False}, "torch": "2.13.0+cpu", "torch_cpu_capability": "AVX512",
           "threads": 2}
    xeon = {**amd, "cpu": "Xeon", "flags": {**amd["flags"], "amx_bf16": True, "amx_tile": True}}
    one = _record([_row("B4", "cmrcnet-x", 0, 0.2)])  # a record of one run: its machine's flags
    one["machine"] |= {"cpu_flags": xeon["flags"], "torch_cpu_capability": "AMX"}
    merged = _record([{**_row("B4", "cmrcnet-x", 0, 0.2), "cpu": cpu_line(amd)},  # a merged row: its own line
                      {**_row("B4", "knn-handcrafted", None, 0.1), "cpu": None}])  # parts disagreed: no claim
    merged |= {"merged_from": ["a.json", "b.json"], "machine": one["machine"]}
    for stem, rec in (("one", one), ("merged", merged)):
        results.write_record(tmp_path / stem, rec)
    rows = results.read_record(tmp_path / "one.json")["runs"]
    assert rows[0]["cpu_flags"] == xeon["flags"] and rows[0]["torch_cpu_capability"] == "AMX"
    a, b = results.read_record(tmp_path / "merged.json")["runs"]
    assert a["cpu_flags"] == amd["flags"] and a["torch_cpu_capability"] == "AVX512"
    assert "cpu_flags" not in b and "torch_cpu_capability" not in b


def _table(n: int, seed: int, sections: list[str]) -> SpotTable:
    rng = np.random.default_rng(seed)
    return SpotTable(torch.zeros((n, 1, 1, 3), dtype=torch.uint8),
                     torch.from_numpy(rng.normal(size=(n, 6)).astype(np.float32)),
                     [sections[i % len(sections)] for i in range(n)], [str(i) for i in range(n)],
                     rng.normal(size=(n, 2)))


def test_baselines_and_their_k_read_training_spots_only() -> None:
    """kNN's k and ridge's fit depend on the training spots alone: changing the test spots changes only the
    test rows' predictions, never k or the fitted probe."""
    pytest.importorskip("sklearn")
    train = _table(120, 0, ["C2", "C3", "C4"])
    f_train = np.random.default_rng(2).normal(size=(120, 8))
    f_test_a, f_test_b = np.random.default_rng(3).normal(size=(2, 10, 8))
    _, info_a = methods.knn_prediction(f_train, f_test_a, train)
    _, info_b = methods.knn_prediction(f_train, f_test_b, train)
    assert info_a["k"] == info_b["k"] and info_a["k_scores"] == info_b["k_scores"]
    pred_a, probe = methods.ridge_prediction(f_train, np.concatenate([f_test_a, f_test_b]), train)
    pred_b, _ = methods.ridge_prediction(f_train, f_test_a, train)
    np.testing.assert_allclose(pred_a[:10], pred_b, atol=1e-8)  # a test row does not move another's prediction
    assert probe["pca_components"] == 8


# ---------------------------------------------------------------------- no test patient in a fold
def test_patient_folds_keep_the_test_patient_out_of_everything() -> None:
    folds = plan.folds(["patient", "within_patient"])
    patient_folds = [f for f in folds if f["protocol"] == "patient"]
    assert {tuple(f["tests"]) for f in patient_folds} == {("B4", plan.DEGRADED), plan.C_IMAGED}
    for f in patient_folds:
        test_patients = {plan.patient_of(t) for t in f["tests"]}
        for role in ("train", "pretrain_slides", "extra_bank"):
            assert not {plan.patient_of(s) for s in f[role]} & test_patients, (f["name"], role)
    within = [f for f in folds if f["protocol"] == "within_patient"]
    assert len(within) == 5 and all(f["tests"][0] not in f["train"] for f in within)
    assert plan.row_protocol(patient_folds[0], plan.DEGRADED) == "patient-degraded"


def test_a_leaky_fold_is_refused() -> None:
    leaky = {"protocol": "patient", "name": "x", "tests": ["B4"], "train": ["C2"], "pretrain_slides": ["C2"],
             "extra_bank": ["B1"]}
    with pytest.raises(ValueError, match="test patient in extra_bank"):
        plan.check_no_leak(leaky)
    with pytest.raises(ValueError, match="test sections"):
        plan.check_no_leak({**leaky, "protocol": "within_patient", "extra_bank": [], "train": ["B4"]})


def test_a_variant_with_its_own_field_of_view_reads_its_own_prepared_patches(tmp_path: Path) -> None:
    from accuracy import runner

    ds = tmp_path / "ds"
    assert runner.variant_ds(ds, "cmrcnet-cpu60") == ds
    ctx = runner.variant_ds(ds, "cmrcnet-cpu60-ctx224")
    assert ctx == tmp_path / "ds_fov224" and ctx != ds
    assert methods.VARIANTS["cmrcnet-cpu60-ctx224"].fov_um == 224.0
    # the context variants differ from their 112 um twins in the field of view only
    for name in ("cmrcnet-cpu60", "bleep-cpu60"):
        a, b = methods.VARIANTS[name].__dict__, methods.VARIANTS[f"{name}-ctx224"].__dict__
        assert {k for k in a if a[k] != b[k]} == {"fov_um", "note"}


def test_a_variant_that_only_selects_other_weights_reuses_the_trained_run(tmp_path: Path, monkeypatch) -> None:
    """`-last` variants copy the complete run of their source (same fold and seed) instead of training the same
    model again; the copy's config selects the other checkpoint and its bank and k are built from those weights.
    A source whose training differs is refused."""
    from dataclasses import replace

    from cmrcnet.data.prepare import prepare_sample
    from cmrcnet.data.synthetic import SyntheticConfig, make_synthetic_samples
    from cmrcnet.inference.bank import load_bank
    from cmrcnet.run.load import load_trained_model

    from accuracy import runner

    ds = tmp_path / "ds"
    for s in make_synthetic_samples(SyntheticConfig(n_slides=2, n_patients=1, n_rows=6, n_cols=6, n_genes=30)):
        prepare_sample(s, ds, patch_px=32, progress=False)
    base = methods.VARIANTS["cmrcnet-cpu60-ctx224-rw3"]
    variants = {"cmrcnet-x": replace(base, fov_um=None),
                "cmrcnet-x-last": replace(base, fov_um=None, train=(("select", "last"),), reuse="cmrcnet-x"),
                "bleep-x-last": replace(base, method="bleep", fov_um=None, train=(("select", "last"),),
                                        reuse="cmrcnet-x")}
    monkeypatch.setattr(methods, "VARIANTS", {**methods.VARIANTS, **variants})
    fold, runs, cache = {"train": ["synS1", "synS2"]}, tmp_path / "runs", tmp_path / "cache"
    runner.trained_run(runs / "cmrcnet-x-seed0", "cmrcnet-x", 0, fold, ds, None, True, cache)
    # from here on nothing may train
    monkeypatch.setattr(runner, "train_run", lambda **kw: pytest.fail(f"trained again: {kw['run_dir']}"))
    source, copy = runs / "cmrcnet-x-seed0", runs / "cmrcnet-x-last-seed0"
    runner.trained_run(copy, "cmrcnet-x-last", 0, fold, ds, None, True, cache)
    assert (copy / "last.pt").read_bytes() == (source / "last.pt").read_bytes()
    assert "select: last" in (copy / "config.yaml").read_text() and runner.complete(copy)
    assert json.loads((copy / "run.json").read_text())["reused_from"] == str(source)
    trained = load_trained_model(copy)
    assert trained.checkpoint == "last.pt"
    assert len(load_bank(copy, trained)) == len(load_bank(source, load_trained_model(source)))
    assert (copy / "retrieval_k.json").is_file() and not (copy.parent / (copy.name + ".tmp")).exists()
    with pytest.raises(SystemExit, match=r"differs in .*method"):
        runner.trained_run(runs / "bleep-x-last-seed0", "bleep-x-last", 0, fold, ds, None, True, cache)
