"""Aggregation of the accuracy rows: seeds first, then sections; paired differences with a bootstrap CI.

A row is one (protocol, test section, method, seed) evaluation. It holds the headline metrics
(`pcc_heg50`, `pcc_hvg50`, `pcc_markers`, `pcc_all`, their `_excl_constant` variants, `spotwise_pcc`,
`n_constant`, ...) and `heg50_genes` / `heg50_pcc`: the per-gene headline PCC of the HEG-50 set (the same genes
for every method of a fold; genes constant in the measured data are None, genes constant in the prediction 0).

Aggregation (EVALUATION.md, issue 13):
1. within each test section, the mean over the seeds run (a deterministic baseline has one row);
2. over sections: mean ± sample sd (ddof=1) of the section means, so every section weighs the same whatever its
   number of seeds.

Each method is paired with every like-for-like baseline (`comparable`: the same smoothing and stain treatment).
Paired comparison of a method against a baseline on HEG-50: per section, d_s = mean over genes of
(PCC_method(g) - PCC_baseline(g)), PCC averaged over seeds first. The point estimate is the mean of d_s over
sections; the 95 % CI is the 2.5/97.5 percentile of a bootstrap that resamples sections with replacement and,
within each drawn section, its genes with replacement (the same genes for both methods: paired). The sign count
is the number of sections with d_s > 0.

Markers (5 genes, some unmeasured in a section) are compared per section only: d_s = marker PCC of the method
minus the baseline's (seed means), with a bootstrap over sections alone and no CI below 3 sections (the rows
keep the per-gene PCC of HEG-50 only).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

METRICS = ("pcc_heg50", "pcc_hvg50", "pcc_markers", "pcc_all", "pcc_heg50_excl_constant",
           "pcc_hvg50_excl_constant", "pcc_markers_excl_constant", "spotwise_pcc", "mse", "mae",
           "gene_gene_corr", "n_constant", "n_excluded_true", "similarity_mean", "confidence_error_spearman",
           "confidence_error_spearman_mse")
BASELINE_PREFIXES = ("knn", "ridge", "mean", "bleep", "regression")
N_BOOT = 2000


def is_baseline(method: str) -> bool:
    return method.startswith(BASELINE_PREFIXES)


MODIFIERS = ("+stain", "+cstain", "+smooth", "-ens", "+bank")  # derived-row suffixes (benchmarks/accuracy/derived.py)


def split_name(method: str) -> tuple[str, str, str]:
    """("cmrcnet", "ssl+hc", "+bank-ens+smooth") from "cmrcnet-ssl+hc+bank-ens+smooth"."""
    head, _, rest = method.partition("-")
    mods = ""
    stripped = True
    while stripped:  # modifiers come in any order and combination
        stripped = False
        for mod in MODIFIERS:
            if rest.endswith(mod):
                rest, mods, stripped = rest[: -len(mod)], mod + mods, True
    return head, rest, mods


def comparable(method: str, base: str) -> bool:
    """Whether `base` is a like-for-like baseline of `method`: the same smoothing and stain treatment, and for
    the trained baselines also the same seed ensembling (bleep, regression) and bank (bleep; kNN, ridge and
    mean have neither, regression has no bank)."""
    keys = ["+smooth", "+stain", "+cstain"]
    if base.startswith(("bleep", "regression")):
        keys.append("-ens")
    if base.startswith("bleep"):
        keys.append("+bank")
    m_mods, b_mods = split_name(method)[2], split_name(base)[2]
    return all((k in m_mods) == (k in b_mods) for k in keys)


def _finite(values: Iterable) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def section_means(rows: Sequence[dict], key: str) -> dict[str, float]:
    """{test section: mean over that section's seeds of rows[key]} (sections with no finite value left out)."""
    by_section: dict[str, list[float]] = {}
    for r in rows:
        by_section.setdefault(r["test"], []).extend(_finite([r.get(key)]))
    return {s: float(np.mean(v)) for s, v in by_section.items() if v}


def mean_sd(values: Sequence[float]) -> dict:
    vals = _finite(values)
    return {"mean": float(np.mean(vals)) if vals else None,
            "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None, "n_sections": len(vals)}


def gene_pcc_by_section(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """{section: {gene: HEG-50 headline PCC averaged over seeds}}; genes constant in the data left out."""
    acc: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        genes, pcc = r.get("heg50_genes") or [], r.get("heg50_pcc") or []
        for g, v in zip(genes, pcc, strict=True):
            if v is not None and math.isfinite(float(v)):
                acc.setdefault(r["test"], {}).setdefault(g, []).append(float(v))
    return {s: {g: float(np.mean(v)) for g, v in genes.items()} for s, genes in acc.items()}


def paired_difference(method_rows: Sequence[dict], base_rows: Sequence[dict], *, n_boot: int = N_BOOT,
                      seed: int = 0) -> dict | None:
    """HEG-50 PCC of method minus baseline, paired by section and gene; None without a common section."""
    a, b = gene_pcc_by_section(method_rows), gene_pcc_by_section(base_rows)
    diffs: list[np.ndarray] = []
    sections = sorted(set(a) & set(b))
    for s in sections:
        genes = sorted(set(a[s]) & set(b[s]))
        diffs.append(np.array([a[s][g] - b[s][g] for g in genes], dtype=np.float64))
    keep = [i for i, d in enumerate(diffs) if d.size]
    sections, diffs = [sections[i] for i in keep], [diffs[i] for i in keep]
    if not diffs:
        return None
    per_section = np.array([d.mean() for d in diffs])
    lo, hi = np.percentile(_bootstrap(diffs, n_boot, seed), [2.5, 97.5])
    return {"heg50_diff": float(per_section.mean()), "heg50_ci95": [float(lo), float(hi)],
            "sign_count": f"{int((per_section > 0).sum())}/{len(per_section)}",
            **section_paired(method_rows, base_rows, "pcc_markers", "markers", n_boot=n_boot, seed=seed)}


def section_paired(method_rows: Sequence[dict], base_rows: Sequence[dict], key: str, name: str, *,
                   n_boot: int = N_BOOT, seed: int = 0, min_sections: int = 3) -> dict:
    """`key` of method minus baseline per section (seed means first): {name}_diff, {name}_ci95 (bootstrap over
    sections; None below `min_sections`) and {name}_sign_count; {} without a common section."""
    a, b = section_means(method_rows, key), section_means(base_rows, key)
    sections = sorted(set(a) & set(b))
    if not sections:
        return {}
    d = np.array([a[s] - b[s] for s in sections])
    ci = None
    if len(d) >= min_sections:
        rng = np.random.default_rng(seed)
        boot = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
        ci = [float(v) for v in np.percentile(boot, [2.5, 97.5])]
    return {f"{name}_diff": float(d.mean()), f"{name}_ci95": ci, f"{name}_sign_count": f"{int((d > 0).sum())}/{len(d)}"}


def _bootstrap(diffs: list[np.ndarray], n_boot: int, seed: int) -> np.ndarray:
    """(n_boot,) means over resampled sections of the mean over each drawn section's resampled genes."""
    rng = np.random.default_rng(seed)
    n_sec, width = len(diffs), max(d.size for d in diffs)
    table = np.zeros((n_sec, width))  # (S, G_max) differences, padded
    sizes = np.array([d.size for d in diffs])
    for i, d in enumerate(diffs):
        table[i, : d.size] = d
    drawn = rng.integers(0, n_sec, size=(n_boot, n_sec))  # (B, S) sections with replacement
    genes = np.floor(rng.random((n_boot, n_sec, width)) * sizes[drawn][..., None]).astype(np.int64)  # (B, S, G)
    valid = np.arange(width)[None, None, :] < sizes[drawn][..., None]  # a drawn section has its own gene count
    values = np.where(valid, table[drawn[..., None], genes], 0.0)
    return (values.sum(axis=2) / sizes[drawn]).mean(axis=1)


def summarise(rows: Sequence[dict], *, n_boot: int = N_BOOT) -> dict:
    """{protocol: {method: {metric: {mean, std, n_sections}, seeds, tests, per_section, vs: {baseline: ...}}}}."""
    by: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        by.setdefault(r["protocol"], {}).setdefault(r["method"], []).append(r)
    out: dict = {}
    for protocol, methods in by.items():
        table: dict = {}
        for method, mrows in methods.items():
            entry: dict = {"tests": sorted({r["test"] for r in mrows}),
                           "seeds_per_section": {s: sorted({r["seed"] for r in mrows if r["test"] == s},
                                                           key=str) for s in sorted({r["test"] for r in mrows})},
                           "n_runs": len(mrows)}
            for key in METRICS:
                per = section_means(mrows, key)
                entry[key] = {**mean_sd(list(per.values())), "per_section": per}
            table[method] = entry
        for method, entry in table.items():
            entry["vs"] = {}
            for base in sorted(m for m in methods if m != method and is_baseline(m) and comparable(method, m)):
                cmp = paired_difference(methods[method], methods[base], n_boot=n_boot)
                if cmp is not None:
                    entry["vs"][base] = cmp
        out[protocol] = table
    return out


def _cpu_fields(line: str) -> tuple[str, str, str]:
    """(model, flags, torch capability) of a `cmrcnet.runtime.cpu_line`: "MODEL; FLAGS; torch V capability C; N
    threads"."""
    model, flags, torch_part = line.split("; ")[:3]
    return model, flags, torch_part.rpartition(" capability ")[2]


def cpu_record(line: str | None) -> dict:
    """{"cpu_flags": {flag: bool, ...}, "torch_cpu_capability": C} read back from a `cmrcnet.runtime.cpu_line`
    (the flags it lists are `CPU_FLAGS_OF_INTEREST` that were on; "no avx2" when none was); {} for anything else."""
    from cmrcnet.runtime import CPU_FLAGS_OF_INTEREST

    if not line or line.count("; ") < 2 or " capability " not in line:
        return {}
    _, flags, capability = _cpu_fields(line)
    on = set() if flags == "no avx2" else set(flags.split())
    return {"cpu_flags": {f: f in on for f in CPU_FLAGS_OF_INTEREST}, "torch_cpu_capability": capability}


def row_cpu(parts: Sequence[dict], method: str) -> str | None:
    """The CPU a row of `method` was measured on, from the parts of its record (`parts`: command, cpu line,
    variants): the cpu line of the parts that ran its variant (every part for a baseline) when they agree; else
    the CPU model, flags and torch capability they share (when they differ only in torch build or threads); else
    None."""
    head, rest, _ = split_name(method)
    candidates = [p for p in parts if f"{head}-{rest}" in (p.get("variants") or [])] or list(parts)
    lines = {p.get("cpu") for p in candidates}
    if len(lines) == 1:
        return lines.pop()
    if None in lines:
        return None
    shared = {_cpu_fields(line) for line in lines}
    if len(shared) != 1:
        return None
    model, flags, capability = shared.pop()
    return f"{model}; {flags}; torch capability {capability}"


def merge_runs(records: Sequence[dict]) -> list[dict]:
    """The runs of several result records; a (protocol, test, method, seed) present in several counts once
    (the later record wins)."""
    unique: dict[tuple, dict] = {}
    for rec in records:
        for r in rec["runs"]:
            unique[(r["protocol"], r["test"], r["method"], r["seed"])] = r
    return list(unique.values())
