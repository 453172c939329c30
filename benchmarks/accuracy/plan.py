"""Folds of the her2st accuracy benchmark, and the rule that no test patient reaches anything a model learns from.

patient (headline): leave-one-patient-out over the imaged patients.
  test B4 (patient B):  train C2-C6; pretrain on C2-C6's slides; extra bank: C1 + patients D-H (never B).
  test C2..C6 (patient C): train B4; pretrain on B4's slide; extra bank: B1-B3, B5, B6 + D-H (never C).
  B4-degraded: the test-B4 fold's models on a copy of B4 at about 3.4 um/px, re-coloured, black background.
within (secondary, "within-patient (same patient in training)"): leave-one-section-out over C2-C6; train the
  other four C sections; pretrain on their slides; no extra bank.
"""

from __future__ import annotations

C_IMAGED = ("C2", "C3", "C4", "C5", "C6")
B_IMAGED = ("B4",)
EXPRESSION_ONLY = ("C1", "B1", "B2", "B3", "B5", "B6", "D1", "D2", "D3", "D4", "D5", "D6", "E1", "E2", "E3",
                   "F1", "F2", "F3", "G1", "G2", "G3", "H1", "H2", "H3")
DEGRADED = "B4deg"  # sample id of the degraded copy of B4 (made by the benchmark, never committed)
PROTOCOL_TITLES = {
    "patient": "Held-out patient (no test patient in training, bank, gene selection, standardisation or "
               "pretraining)",
    "patient-degraded": "Held-out patient, B4 degraded to ~3.4 um/px, re-coloured, black background",
    "within_patient": "within-patient (same patient in training): leave-one-section-out over C2-C6",
}


def patient_of(sample: str) -> str:
    """her2st section ids are patient letter + number (B4deg: patient B)."""
    return sample[0]


def extra_bank_for(test_patient: str) -> list[str]:
    return [s for s in EXPRESSION_ONLY if patient_of(s) != test_patient]


def folds(protocols: list[str], *, quick: bool = False) -> list[dict]:
    """The fold plan: {protocol, name, tests, train, pretrain_slides, extra_bank}; checked for leakage."""
    out = []
    if "patient" in protocols:
        if quick:
            out.append({"protocol": "patient", "name": "patient-test-B", "tests": ["B4"], "train": ["C2"],
                        "pretrain_slides": ["C2"], "extra_bank": ["D1"]})
        else:
            out.append({"protocol": "patient", "name": "patient-test-B", "tests": ["B4", DEGRADED],
                        "train": list(C_IMAGED), "pretrain_slides": list(C_IMAGED),
                        "extra_bank": extra_bank_for("B")})
            out.append({"protocol": "patient", "name": "patient-test-C", "tests": list(C_IMAGED),
                        "train": list(B_IMAGED), "pretrain_slides": list(B_IMAGED),
                        "extra_bank": extra_bank_for("C")})
    if "within_patient" in protocols and not quick:
        for test in C_IMAGED:
            train = [s for s in C_IMAGED if s != test]
            out.append({"protocol": "within_patient", "name": f"within-test-{test}", "tests": [test], "train": train,
                        "pretrain_slides": train, "extra_bank": []})
    for fold in out:
        check_no_leak(fold)
    return out


def row_protocol(fold: dict, test: str) -> str:
    return "patient-degraded" if test == DEGRADED else fold["protocol"]


def check_no_leak(fold: dict) -> None:
    """Raise ValueError when a patient-level fold lets a test patient into training, pretraining or the bank;
    a within-patient fold may share the patient but never the test section."""
    tests = set(fold["tests"])
    used = {"train": fold["train"], "pretrain_slides": fold["pretrain_slides"], "extra_bank": fold["extra_bank"]}
    for role, samples in used.items():
        if tests & set(samples):
            raise ValueError(f"{fold['name']}: test sections {sorted(tests & set(samples))} in {role}")
    if fold["protocol"] == "patient":
        test_patients = {patient_of(t) for t in tests}
        for role, samples in used.items():
            bad = sorted(s for s in samples if patient_of(s) in test_patients)
            if bad:
                raise ValueError(f"{fold['name']}: sections {bad} of a test patient in {role}")
