import pytest

from cmrcnet.data.splits import describe_folds, make_folds, validation_spots
from cmrcnet.errors import ConfigError

PATIENTS = {"A1": "A", "A2": "A", "B1": "B", "B2": "B", "C1": "C", "D1": "D"}


@pytest.mark.parametrize("kind", ["leave-one-patient-out", "kfold"])
def test_no_patient_in_two_sides(kind: str) -> None:
    folds = make_folds(list(PATIENTS), PATIENTS, kind=kind, k=3, seed=1)
    tested = [s for f in folds for s in f.test]
    assert sorted(tested) == sorted(PATIENTS)  # every sample tested exactly once
    for f in folds:
        assert not {PATIENTS[s] for s in f.train} & {PATIENTS[s] for s in f.test}
        assert f.shared_patients == []


def test_leave_one_sample_out_flags_shared_patients() -> None:
    folds = make_folds(list(PATIENTS), PATIENTS, kind="leave-one-sample-out")
    assert [f.name for f in folds] == list(PATIENTS)
    by_name = {f.name: f for f in folds}
    assert by_name["A1"].shared_patients == ["A"] and by_name["C1"].shared_patients == []
    assert "section-level split" in describe_folds(folds, PATIENTS)


def test_kfold_is_seeded() -> None:
    a = make_folds(list(PATIENTS), PATIENTS, kind="kfold", k=2, seed=7)
    b = make_folds(list(PATIENTS), PATIENTS, kind="kfold", k=2, seed=7)
    assert [f.test for f in a] == [f.test for f in b]


def test_split_errors() -> None:
    with pytest.raises(ConfigError, match="at least 2 patients"):
        make_folds(["A1", "A2"], PATIENTS, kind="leave-one-patient-out")
    with pytest.raises(ConfigError, match="unknown split"):
        make_folds(["A1", "B1"], PATIENTS, kind="random")  # type: ignore[arg-type]


def test_validation_spots_are_seeded_per_sample() -> None:
    spots = {"a": [f"s{i}" for i in range(50)], "b": [f"t{i}" for i in range(10)]}
    v1 = validation_spots(spots, fraction=0.2, seed=0)
    assert len(v1["a"]) == 10 and len(v1["b"]) == 2
    assert v1 == validation_spots(spots, fraction=0.2, seed=0)
    assert v1["a"] == validation_spots({"a": spots["a"]}, fraction=0.2, seed=0)["a"]  # independent of others
    assert v1 != validation_spots(spots, fraction=0.2, seed=1)
