"""Targets met or not, and findings, from the sections' results."""

from __future__ import annotations

from typing import Any

from .common import RECALL_TARGET


# ---------------------------------------------------------------------------------------------- targets
def _auto_precision(sections: dict) -> str:
    """The precision `--precision auto` picks on the machine these sections ran on (cmrcnet.runtime)."""
    machine = next((s["machine"] for s in sections.values() if "machine" in s), {})
    return machine.get("precision_auto", "bf16")


def _baseline(rows: list[dict], preset: str, precision: str, unit: str, **match: Any) -> float | None:
    for r in rows:
        if (r["preset"], r["precision"], r["variant"]) == (preset, precision, "baseline") and unit in r:
            if all(r.get(k) == v for k, v in match.items()):
                return float(r[unit])
    return None


def targets(sections: dict, quick: bool) -> list[dict]:
    """The issues' targets against what was measured, each against the limit of the precision actually used
    (the one `--precision auto` picks here); n/a when not measured."""
    rows: list[dict] = []
    if quick:
        return rows
    auto = _auto_precision(sections)
    train = sections.get("train", {})
    trows = train.get("results", [])
    for preset, tp in train.get("presets", {}).items():
        fp32 = _baseline(trows, preset, "fp32", "spots_per_s")
        used = _baseline(trows, preset, auto, "spots_per_s")
        if fp32 and used:
            ratio = used / fp32
            rows.append({
                "target": f"{preset}-preset training at the default precision (auto -> {auto}) within 0.8-1.25x of "
                          "fp32 without native bf16, no slower than fp32 with it",
                "measured": f"{used} spots/s {auto} vs {fp32} fp32 (x{ratio:.2f})",
                "limit": f"{tp['ceiling_spots_per_s'][auto]} spots/s {auto} FLOP ceiling",
                "met": ratio >= 1.0 if auto == "bf16" else 0.8 <= ratio <= 1.25,
            })  # fmt: skip
    tp = train.get("presets", {}).get("paper")
    fp32 = _baseline(trows, "paper", "fp32", "spots_per_s")
    if tp and fp32:
        ceiling = tp["ceiling_spots_per_s"]["fp32"]
        rows.append({
            "target": "paper-preset fp32 training >= 90% of the fp32 FLOP ceiling",
            "measured": f"{fp32} spots/s = {100 * fp32 / ceiling:.0f}%",
            "limit": f"{ceiling} spots/s = fp32 matmul peak {train['matmul_peak_gflops']['fp32']} GFLOP/s / "
                     f"{tp['train_gflop_per_spot']} GFLOP per spot",
            "met": fp32 >= 0.9 * ceiling,
        })  # fmt: skip
    inf = sections.get("inference", {}).get("presets", {})
    slide = sections.get("slide", {})
    for r in slide.get("results", []):
        info = inf.get(r["preset"])
        if r.get("exit") != 0 or not info:
            continue
        ceiling = info["ceiling_patches_per_s"][auto]
        embed = _baseline(sections["inference"].get("results", []), r["preset"], auto, "patches_per_s",
                          batch_size=64)  # fmt: skip
        rows.append({
            "target": f"{r['preset']}-preset whole-slide prediction >= 70% of the encoder's {auto} FLOP ceiling "
                      f"({r['side_px']} px slide, {r['n_tissue_tiles']} tiles)",
            "measured": f"{r['tiles_per_second']} tiles/s = {100 * r['tiles_per_second'] / ceiling:.0f}%"
                        + (f" (embed_images alone: {embed} patches/s = {100 * embed / ceiling:.0f}%)" if embed else ""),
            "limit": f"{ceiling} tiles/s = {auto} matmul peak / {info['embed_gflop_per_patch']} GFLOP per tile",
            "met": r["tiles_per_second"] >= 0.7 * ceiling,
        })  # fmt: skip
    lv = slide.get("large_vs_small", {}).get("paper")
    if lv:
        rows.append({
            "target": "slide peak RSS independent of slide size (paper preset)",
            "measured": f"peak RSS x{lv['peak_rss_ratio']} ({lv['peak_rss_increase_mb']:+} MB) for x{lv['area_ratio']} area, x{lv['tile_ratio']} tiles",
            "met": lv["peak_rss_ratio"] <= 1.05,
            "note": "; ".join(f"{k} preset: x{v['peak_rss_ratio']} ({v['peak_rss_increase_mb']:+} MB)"
                              for k, v in slide["large_vs_small"].items() if k != "paper"),
        })  # fmt: skip
    best = sections.get("retrieval", {}).get("best_approximate", {}).get("1000000")
    if best:
        rows.append({
            "target": "FAISS >= 10x exact search at recall@50 >= 0.95, 1e6 spots",
            "measured": f"{best['speedup_vs_exact_torch']}x ({best['queries_per_s']} q/s, recall {best['recall_at_50']}, {best['method']} {best['options']})",
            "met": best["speedup_vs_exact_torch"] >= 10 and best["recall_at_50"] >= RECALL_TARGET,
        })  # fmt: skip
    return rows


def profile_text(prof: dict | None) -> str:
    if not prof or "fraction" not in prof:
        return ""
    parts = [f"{k} {100 * v:.0f}%" for k, v in prof["fraction"].items() if v >= 0.005]
    return "; profile of one bf16 call (self time): " + ", ".join(parts)


def findings(sections: dict) -> list[str]:
    """Plain statements derived from the numbers: which variants paid, where the time goes."""
    notes = []
    for sec_name, unit in (("train", "spots_per_s"), ("inference", "patches_per_s")):
        sec = sections.get(sec_name, {})
        rows = sec.get("results", [])
        for preset in sec.get("presets", {}):
            ups, downs = [], []
            for r in rows:
                if (
                    r["preset"] != preset
                    or "speedup_vs_baseline" not in r
                    or r["variant"].startswith("baseline")
                ):
                    continue
                txt = f"{r['variant']} ({r['precision']}) x{r['speedup_vs_baseline']}"
                if "compile_seconds" in r:
                    txt += f" after {r['compile_seconds']} s of compilation"
                (ups if r["speedup_vs_baseline"] >= 1.03 else downs).append(txt)
            errors = [f"{r['variant']}: {r['error']}" for r in rows if r["preset"] == preset and "error" in r]
            ba = sec["presets"][preset].get("before_after_bf16", {})
            after = ba.get("after") or ba.get("after_any") or {}
            notes.append(
                f"{sec_name}, {preset}: paid: {', '.join(ups) or 'none'}; did not pay (< x1.03): "
                f"{', '.join(downs) or 'none'}" + (f"; errors: {'; '.join(errors)}" if errors else "")
                + f". bf16 before {ba.get('before', {}).get(unit)} -> after {after.get(unit)} ({after.get('variant')})."
            )  # fmt: skip
    ret = sections.get("retrieval", {})
    for n, best in ret.get("best_approximate", {}).items():
        notes.append(
            f"retrieval, bank {n}: fastest index with test recall@50 >= {RECALL_TARGET}: {best['method']} "
            f"{best['options']}, {best['queries_per_s']} q/s = x{best['speedup_vs_exact_torch']} exact torch, "
            f"recall {best['recall_at_50']}, build {best['build_seconds']} s."
        )
    slide = sections.get("slide", {})
    inf = sections.get("inference", {})
    for r in slide.get("results", []):
        base = [x for x in inf.get("results", []) if x["preset"] == r["preset"] and x["variant"] == "baseline"
                and x["precision"] == "bf16" and x["batch_size"] == 64 and "patches_per_s" in x]  # fmt: skip
        if base and r.get("tiles_per_second"):
            notes.append(
                f"slide, {r['preset']} {r['side_px']} px: {r['tiles_per_second']} tiles/s = "
                f"{100 * r['tiles_per_second'] / base[0]['patches_per_s']:.0f}% of embed_images alone "
                f"({base[0]['patches_per_s']} patches/s bf16, batch 64); the rest is reading, resizing, "
                "retrieval and the reader thread competing for the 2 cores."
            )
    return notes
