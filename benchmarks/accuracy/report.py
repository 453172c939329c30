"""Markdown for the her2st accuracy results (the same numbers as the JSON's summary)."""

from __future__ import annotations

import re
from collections import Counter

from .plan import PROTOCOL_TITLES
from .stats import is_baseline, split_name

ORDER = ("patient", "patient-degraded", "within_patient")
COLUMNS = (("pcc_heg50", "HEG-50 PCC"), ("pcc_hvg50", "HVG-50 PCC"), ("pcc_markers", "markers PCC"),
           ("spotwise_pcc", "spot-wise PCC"), ("n_constant", "genes constant in pred."),
           ("pcc_heg50_excl_constant", "HEG-50, constant excluded"))


def _cell(s: dict, digits: int = 3) -> str:
    if s.get("mean") is None:
        return "n/a"
    return f"{s['mean']:.{digits}f}" + (f" ± {s['std']:.{digits}f}" if s.get("std") is not None else "")


def _ci(c: dict, name: str = "heg50") -> str:
    if f"{name}_diff" not in c:
        return ""
    sign = c["sign_count"] if name == "heg50" else c[f"{name}_sign_count"]
    if c.get(f"{name}_ci95") is None:
        return f"{c[f'{name}_diff']:+.3f} {sign}"
    lo, hi = c[f"{name}_ci95"]
    mark = " **>0**" if lo > 0 else (" <0" if hi < 0 else "")
    return f"{c[f'{name}_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] {sign}{mark}"


def _header(rec: dict) -> list[str]:
    m = rec["machine"]
    status = "" if rec.get("complete") else " (PARTIAL: not every fold and seed had finished)"
    if rec.get("parts"):
        status = ""  # a merge of parts, each of which may cover some folds only
        where = sorted({f"{p.get('cpu')}" + (f" + GPU {p['gpu']}" if p.get("gpu") else "") for p in rec["parts"]})
        machine = (f"Merged from {len(rec['parts'])} parts (listed at the end with their commands, commits and "
                   f"machines), run on: {'; '.join(where)}.")
    else:
        machine = (
            f"Commit {rec['commit']}{' (src/ had uncommitted changes)' if rec.get('src_uncommitted_changes') else ''}"
            f"; {m.get('cpu_line', m['cpu'])}; torch {m['torch']}, {m.get('torch_threads')} threads; precision "
            f"auto -> {m.get('precision_auto')}; load at start {m.get('load_average_at_start')}; wall time "
            f"{rec.get('wall_seconds', 0) / 60:.1f} min.")
    return [
        f"# her2st accuracy{' (QUICK smoke run: tiny model, 1 epoch; not a result)' if rec['quick'] else ''}"
        + status, "",
        f"Command: `{rec['command']}`  " if not rec.get("parts") else "Command: see the parts below.  ",
        machine, "",
        "How to read: one row per (test section, method, seed) is evaluated with the strict protocol (HEG-50 = "
        "the 50 genes of highest mean log1p expression over the fold's TRAINING spots, HVG-50 by Seurat-v1 "
        "dispersion on the same spots, both from a panel of top-250 HVG + top-100 highly expressed genes + "
        f"markers chosen on the training sections; markers {', '.join(rec['markers'])} where the training "
        "sections measure them). Seeds are averaged within each section first; tables give mean ± sd over "
        "sections. A gene constant in a prediction scores PCC 0 (the last column excludes it instead). "
        f"Retrieval/kNN k is chosen from {rec['k_grid']} by leave-one-training-section-out validation (two "
        "spatial halves when the fold has one training section). Paired differences: HEG-50 PCC of the row's "
        "method minus the column's baseline, mean over sections, bootstrap 95 % CI resampling sections and "
        "genes, and the number of sections where the method is ahead; **>0** marks a CI above 0.", "",
    ]


def _table(table: dict) -> list[str]:
    lines = ["| method | sections | seeds per section | " + " | ".join(t for _, t in COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(COLUMNS)]
    order = sorted(table, key=lambda m: -(table[m]["pcc_heg50"]["mean"] or -9))
    for m in order:
        e = table[m]
        seeds = sorted({len(v) for v in e["seeds_per_section"].values()})
        cells = [_cell(e[key], 1 if key == "n_constant" else 3) for key, _ in COLUMNS]
        lines.append(f"| {m} | {len(e['tests'])} | {'/'.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    return lines


# a variant's reconstruction-only suffixes (methods.py: weight "-rw10", mask keep probability "-keep25",
# relative reconstruction loss "-relrecon"), last in its name or before the choice of weights "-last" or "-ema"
RECON_SUFFIXES = re.compile(r"(-rw[0-9.]+|-keep[0-9]+|-relrecon)+(?=(-last|-ema)?$)")
PEER_KINDS = ("mean", "knn-handcrafted", "knn", "ridge", "bleep", "regression")


def peer(method: str, kind: str, table: dict) -> str | None:
    """The baseline of `kind` on the same features with the same modifiers (smoothing, ensemble, bank)."""
    _, feats, mods = split_name(method)
    plain = mods.replace("+bank", "").replace("-ens", "")  # kNN/ridge baselines have no bank and no seeds
    no_recon = RECON_SUFFIXES.sub("", feats)  # BLEEP has no reconstruction term: one peer whatever the reconstruction
    candidates = {"mean": ["mean"], "knn-handcrafted": [f"knn-handcrafted{plain}"],
                  "knn": [f"knn-{feats}{plain}"], "ridge": [f"ridge-{feats}{plain}"],
                  "bleep": [f"bleep-{feats}{mods}", f"bleep-{no_recon}{mods}"],
                  "regression": [f"regression-{feats}{mods.replace('+bank', '')}"]}
    found = [c for c in candidates[kind] if c in table and c != method]
    return found[0] if found else None


def _paired(table: dict, name: str = "heg50") -> list[str]:
    what = ("HEG-50 PCC differences" if name == "heg50" else
            "marker PCC differences (per section only: bootstrap over sections, no CI below 3 sections)")
    lines = ["", f"Paired {what} against the baselines on the same features and with the same "
             "smoothing/ensembling (method minus baseline: mean [95 % CI] sections ahead; the JSON holds every "
             "pair):", "", "| method | " + " | ".join(PEER_KINDS) + " |", "|---|" + "---|" * len(PEER_KINDS)]
    order = sorted(table, key=lambda m: (is_baseline(m), -(table[m]["pcc_heg50"]["mean"] or -9)))
    for m in order:
        if is_baseline(m) and not m.startswith(("bleep", "regression")):
            continue
        vs = table[m]["vs"]
        cells = []
        for kind in PEER_KINDS:
            b = peer(m, kind, table)
            cells.append(f"{b}: {_ci(vs[b], name)}" if b and b in vs and _ci(vs[b], name) else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def _per_section(table: dict) -> list[str]:
    tests = sorted({t for e in table.values() for t in e["tests"]})
    lines = ["", "HEG-50 PCC per test section (mean over seeds):", "",
             "| method | " + " | ".join(tests) + " |", "|---|" + "---|" * len(tests)]
    for m in sorted(table, key=lambda m: -(table[m]["pcc_heg50"]["mean"] or -9)):
        per = table[m]["pcc_heg50"]["per_section"]
        lines.append(f"| {m} | " + " | ".join(f"{per[t]:.3f}" if t in per else "" for t in tests) + " |")
    return lines


def _k_lines(runs: list[dict], protocol: str) -> list[str]:
    ks = [(r["method"], r["k"], r.get("k_at_grid_top")) for r in runs if r["protocol"] == protocol and r.get("k")]
    if not ks:
        return []
    count = Counter(k for _, k, _ in ks)
    top = sum(1 for _, _, t in ks if t)
    return ["", f"k chosen ({len(ks)} choices): " + ", ".join(f"k={k}: {n}" for k, n in sorted(count.items()))
            + f"; at the top of the grid (or the bank size): {top}."]


def _confidence(table: dict) -> list[str]:
    rows = [(m, e) for m, e in table.items() if e.get("confidence_error_spearman", {}).get("mean") is not None
            and "+smooth" not in m and "-ens" not in m]
    if not rows:
        return []
    lines = ["", "Retrieval confidence (obs `retrieval_similarity`, mean cosine similarity of the k retrieved spots) "
             "against the actual per-spot error: Spearman rho with 1 - spot-wise PCC and with per-spot MSE "
             "(negative = the confidence is useful):", "",
             "| method | mean similarity | rho (1 - spot PCC) | rho (MSE) |", "|---|---|---|---|"]
    for m, e in sorted(rows):
        lines.append(f"| {m} | {_cell(e['similarity_mean'])} | {_cell(e['confidence_error_spearman'])} | "
                     f"{_cell(e['confidence_error_spearman_mse'])} |")
    return lines


def markdown(rec: dict) -> str:
    lines = _header(rec)
    summary = rec.get("summary", {})
    for protocol in [p for p in ORDER if p in summary] + [p for p in summary if p not in ORDER]:
        table = summary[protocol]
        lines += [f"## {PROTOCOL_TITLES.get(protocol, protocol)}", ""]
        lines += _table(table) + _paired(table) + _paired(table, "markers") + _per_section(table) + _k_lines(rec.get("runs", []), protocol)
        lines += _confidence(table)
        lines.append("")
    lines += ["## Variants", ""]
    for name, v in rec.get("variants", {}).items():
        lines.append(f"- `{name}`: {v}")
    lines += ["", "Baselines: `mean` (training mean per gene), `knn-handcrafted` (27 colour/texture statistics), "
              "`knn-<features>` and `ridge-<features>` on the SAME frozen features as the variant of that name "
              "(mean-pooled encoder tokens + the model's standardised handcrafted features); ridge follows "
              "HEST-Benchmark (StandardScaler, PCA 256, Ridge alpha = 100 / (components x genes)), with an "
              "intercept. `+bank`: the same model retrieving also from the expression-only sections of other "
              "patients (never the test patient).", "", "## Pretrained encoders (SimCLR, `cmrcnet pretrain`)", ""]
    for name, info in rec.get("encoders", {}).items():
        p = info.get("pretraining", {})
        slides = [s["path"].rsplit("/", 1)[-1] for s in p.get("slides", [])]
        lines.append(f"- {name}: slides {slides}, {p.get('n_tiles')} tiles, {p.get('wall_seconds')} s")
    lines += _train_times(rec.get("runs", []), set(rec.get("variants", {}))) + _parts(rec)
    return "\n".join(lines) + "\n"


def _train_times(runs: list[dict], variants: set[str]) -> list[str]:
    """Training time per trained variant and device (sum of the epochs' times, mean over its runs)."""
    times: dict[tuple, dict] = {}  # (variant, device) -> {(fold, seed): seconds}: one model, several test rows
    for r in runs:
        if r.get("train_seconds") and r["method"] in variants:
            times.setdefault((r["method"], r.get("train_device", "cpu")), {})[(r.get("fold"), r["seed"])] = \
                r["train_seconds"]
    if not times:
        return []
    lines = ["", "## Training time (sum of the epochs' times; mean over the trained models)", "",
             "| variant | device | models | seconds |", "|---|---|---|---|"]
    for (method, device), by_model in sorted(times.items()):
        ts = list(by_model.values())
        lines.append(f"| {method} | {device} | {len(ts)} | {sum(ts) / len(ts):.0f} |")
    return lines


def _parts(rec: dict) -> list[str]:
    """Where the parts of a merged record ran."""
    if not rec.get("parts"):
        return []
    lines = ["", "## Parts of this merged result", ""]
    for p in rec["parts"]:
        gpu = f", GPU {p['gpu']}" if p.get("gpu") else ""
        wall = p.get("wall_seconds") or 0
        lines.append(f"- `{p['command']}`: commit {p.get('commit')}; {p.get('cpu')}; training device "
                     f"{p.get('device', 'cpu')}{gpu}; {wall / 60:.0f} min; variants {', '.join(p['variants'])}")
    return lines
