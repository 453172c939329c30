"""The report writer: speed.md from the merged results JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .targets import profile_text


# ---------------------------------------------------------------------------------------------- report
def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, bool):
            return "yes" if v else "**no**"
        return str(v).replace("|", "/")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _pct(x: float | None) -> str | None:
    return None if x is None else f"{100 * x:.0f}%"


def _meta(s: dict) -> str:
    return (
        f"_`{s.get('command')}` at {s.get('git_commit')}; {s.get('wall_seconds')} s; load average "
        f"{s.get('load_average_before')} before, {s.get('load_average_after')} after; other processes used "
        f"{s.get('others_cpu_cores_mean')} cores on average during the section (waited {s.get('waited_for_quiet_s')} s "
        f"for a quiet machine; this process: nice {s.get('niceness')}, {s.get('autogroup')})._"
    )


def _probe_text(machine: dict) -> str:
    pr = machine.get("precision_probe") or {}
    if not pr:
        return "not recorded"
    return f"fp32 {pr['fp32_gflops']} GFLOP/s, bf16 {pr['bf16_gflops']} GFLOP/s (bf16 x{pr['bf16_speedup']})"


def _note(r: dict) -> str | None:
    """A result row's note: its error, why it was skipped, or its compile time and note."""
    compiled = f"compile {r['compile_seconds']} s" if "compile_seconds" in r else ""
    return (
        r.get("error") or r.get("skipped") or "; ".join(x for x in (compiled, r.get("note", "")) if x) or None
    )


def _setup_lines(s: dict) -> list[str]:
    """The setup sentence and the attention kernel src's autocast_context leaves enabled (train, inference)."""
    return [
        s["setup"] + ".",
        "",
        f"Attention kernel inside src's autocast_context: {s.get('src_attention_kernel')}.",
        "",
    ]


def _peak_md(s: dict) -> list[str]:
    """The peak section's body (below its title and meta line)."""
    md: list[str] = []
    pk = s["matmul_peak_gflops"]
    md.append(f"Matmul peak ({s['matmul_peak_method']}): **fp32 {pk['fp32']} GFLOP/s, bf16 {pk['bf16']} GFLOP/s**; "
              f"int8 dynamically quantised Linear: {s['int8_dynamic_linear_gops']} GOP/s.")  # fmt: skip
    md += ["", "The model's own GEMM shapes (batch 64 x 50 tokens):", ""]
    md.append(_table(["precision", "m, k, n", "GFLOP/s"], [[g["precision"], g["m_k_n"], g["gflops"]] for g in s["model_gemm_gflops"]]))  # fmt: skip
    return md


def _train_md(s: dict) -> list[str]:
    """The train section's body (below its title and meta line)."""
    md = _setup_lines(s)
    for name, info in s["presets"].items():
        po = info["pipeline_overheads"]
        fc = info["flop_check_batch8"]
        md.append(
            f"- **{name}**: {info['train_gflop_per_spot']} GFLOP per spot (analytic; FlopCounterMode without "
            f"attention: {fc['flopcounter_gflop_per_spot_no_attention']} vs analytic {fc['analytic_gflop_per_spot']} at batch 8); "
            f"ceiling {info['ceiling_spots_per_s']['fp32']} spots/s fp32, {info['ceiling_spots_per_s']['bf16']} bf16. "
            f"Trainer overheads per step: augment {po['augment_ms']} ms, EMA update {po['ema_update_ms']} ms "
            f"({po['n_parameters'] / 1e6:.1f} M parameters). bf16 before/after: {info['before_after_bf16']['before']['spots_per_s']} -> "
            f"{info['before_after_bf16']['after']['spots_per_s']} ({info['before_after_bf16']['after']['variant']})"
            f"{profile_text(info.get('profile_bf16_step'))}."
        )  # fmt: skip
    md.append("")
    md.append(_table(
        ["preset", "precision", "variant", "spots/s", "GFLOP/s", "of peak", "vs baseline", "others' cores", "note"],
        [[r["preset"], r["precision"], r["variant"], r.get("spots_per_s"), r.get("achieved_gflops"),
          _pct(r.get("fraction_of_peak")), r.get("speedup_vs_baseline"), r.get("others_cpu_cores"),
          _note(r)]
         for r in s["results"]],
    ))  # fmt: skip
    return md


def _inference_md(s: dict) -> list[str]:
    """The inference section's body (below its title and meta line)."""
    md = _setup_lines(s)
    for name, info in s["presets"].items():
        ba = info["before_after_bf16"]
        md.append(
            f"- **{name}**: {info['embed_gflop_per_patch']} GFLOP per patch (encoder + image head; "
            f"`model_flops_per_spot(training=False)` = {info['model_flops_per_spot_training_false_gflop']} counts the whole loss forward); "
            f"ceiling {info['ceiling_patches_per_s']['fp32']} patches/s fp32, {info['ceiling_patches_per_s']['bf16']} bf16. "
            f"bf16 before/after: {ba['before']['patches_per_s']} -> {ba['after_same_numerics']['patches_per_s']} "
            f"({ba['after_same_numerics']['variant']}); any numerics: {ba['after_any']['patches_per_s']} ({ba['after_any']['variant']})"
            f"{profile_text(info.get('profile_bf16_batch'))}."
        )  # fmt: skip
    md.append("")
    md.append(_table(
        ["preset", "precision", "batch", "variant", "patches/s", "GFLOP/s", "of peak", "vs baseline", "min cos to fp32", "err / spread", "others' cores", "note"],
        [[r["preset"], r["precision"], r["batch_size"], r["variant"], r.get("patches_per_s"), r.get("achieved_gflops"),
          _pct(r.get("fraction_of_peak")), r.get("speedup_vs_baseline"), r.get("cosine_to_fp32_min"), r.get("error_over_spread"),
          r.get("others_cpu_cores"), _note(r)]
         for r in s["results"]],
    ))  # fmt: skip
    return md


def _retrieval_md(s: dict) -> list[str]:
    """The retrieval section's body (below its title and meta line)."""
    md: list[str] = []
    md += [f"Data: {s['data']}", "", f"Protocol: {s['protocol']}. faiss {s['faiss_version']}.", ""]
    if s.get("faiss_skipped"):
        md += [f"**{s['faiss_skipped']}.**", ""]
    md.append(_table(
        ["bank", "method", "options", "build s", "queries/s", "recall@50", "x exact torch", "others' cores"],
        [[r["bank_size"], r["method"], json.dumps(r.get("options")) if r.get("options") else r.get("skipped"),
          r.get("build_seconds"), r.get("queries_per_s"), r.get("recall_at_50"), r.get("speedup_vs_exact_torch"), r.get("others_cpu_cores")]
         for r in s["results"]],
    ))  # fmt: skip
    md += [
        "",
        "One slide batch (64 tiles, 250 genes): the bank prepared for every batch (`predict_from_embeddings`, "
        "predict-slide before this change) against once per slide (`BankRetriever`, predict-slide now):",
        "",
    ]
    md.append(_table(
        ["bank", "predict_from_embeddings ms (per batch: check, normalise, index)", "BankRetriever.predict ms (built once)", "tiles/s ceiling from retrieval"],
        [[r["bank_size"], r["predict_from_embeddings_ms"], r.get("bank_retriever_predict_ms", r.get("prebuilt_index_search_and_aggregate_ms")),
          r["tiles_per_s_ceiling_from_retrieval"]] for r in s["slide_batch_retrieval"]],
    ))  # fmt: skip
    return md


def _slide_md(s: dict) -> list[str]:
    """The slide section's body (below its title and meta line)."""
    md: list[str] = []
    md += [s["setup"] + ".", ""]
    md.append(_table(
        ["preset", "side px", "tissue tiles", "tiles/s", "peak RSS MB", "above load-only MB", "others' cores", "exit"],
        [[r["preset"], r["side_px"], r.get("n_tissue_tiles"), r.get("tiles_per_second"), r.get("peak_rss_mb"),
          r.get("peak_rss_above_load_only_mb"), r.get("others_cpu_cores"), r["exit"]] for r in s["results"]],
    ))  # fmt: skip
    md += ["", "Load-only children (import + model + bank): " + ", ".join(
        f"{k} {v['peak_rss_mb']} MB" for k, v in s["load_only_baseline"].items()) + "."]  # fmt: skip
    md += ["", "Large vs small slide: " + "; ".join(
        f"{k}: peak RSS x{v['peak_rss_ratio']} ({v['peak_rss_increase_mb']:+} MB) for x{v['area_ratio']} area" for k, v in s["large_vs_small"].items()) + "."]  # fmt: skip
    return md


SECTION_WRITERS = (  # (results key, title, body writer), in report order
    ("peak", "Peak", _peak_md),
    ("train", "Training (spots/s)", _train_md),
    ("inference", "Inference: patch encoding (patches/s)", _inference_md),
    ("retrieval", "Retrieval (queries/s, top-50)", _retrieval_md),
    ("slide", "Whole slide (predict-slide)", _slide_md),
)


def write_markdown(path: Path, report: dict) -> None:
    """speed.md: the machine and precision probe, the targets, one part per section run, the findings."""
    sec = report["sections"]
    machine = next((s["machine"] for s in sec.values() if "machine" in s), {})
    md = [
        "# Speed: training, encoding, retrieval and whole-slide prediction against the machine's limit",
        "",
        f"Written by `{report['command']}` (commit {report['git_commit']}). Machine: {machine.get('cpu')}, "
        f"{machine.get('cores')} cores, torch {machine.get('torch')} ({machine.get('torch_threads')} threads).",
        "",
        f"**CPU: {machine.get('cpu_line')}.** Precision probe (256^3 GEMM, cmrcnet.runtime): "
        f"{_probe_text(machine)}; `--precision auto` runs **{machine.get('precision_auto')}** here, and every "
        "target below is stated against that precision's measured limit. "
        "Each section lists its own command, commit, wall time and load average (2 cores: a load above ~2 "
        "means another job shared the CPUs and the figures are lower bounds).",
        "",
        "## Targets",
        "",
    ]
    tg = report.get("targets") or []
    if tg:
        md.append(_table(["target", "measured", "limit on this machine", "met", "note"],
                         [[t["target"], t["measured"], t.get("limit"), t["met"], t.get("note")] for t in tg]))  # fmt: skip
    else:
        md.append("_No target applies to this run (quick mode or sections not run)._")
    for key, title, body in SECTION_WRITERS:
        if key in sec:
            s = sec[key]
            md += ["", f"## {title}", "", _meta(s), ""]
            md += [f"ERROR: {s['error']}"] if "error" in s else body(s)
    notes = report.get("notes")
    if notes:
        md += ["", "## Findings", "", *[f"- {n}" for n in notes]]
    path.write_text("\n".join(md) + "\n", encoding="utf-8")
