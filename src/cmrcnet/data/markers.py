"""Marker-gene sets for evaluation: parsing a user's list and the defaults.

A marker set is reported next to HEG-50, HVG-50 and all genes (EVALUATION.md). It is fixed in advance from the
literature (or from the synthetic generator's ground truth), so choosing it never looks at any slide.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from cmrcnet.data.synthetic import NOISE_PROGRAM, marker_genes
from cmrcnet.errors import ConfigError, InputFileError

logger = logging.getLogger(__name__)

# Breast cancer markers (her2st and most public breast ST data). One citation per gene.
BREAST_CANCER_MARKERS: tuple[str, ...] = (
    # HER2 (17q12 amplicon); amplification in breast cancer: Slamon et al., Science 1987. Its spatial
    # expression in the her2st sections: Andersson et al., Nat Commun 2021.
    "ERBB2",
    # co-amplified and co-overexpressed with ERBB2 in breast cancer: Stein et al., EMBO J 1994.
    "GRB7",
    # oestrogen receptor alpha, luminal gene cluster: Perou et al., Nature 2000.
    "ESR1",
    # progesterone receptor, scored with ER in breast cancer: Hammond et al. (ASCO/CAP), J Clin Oncol 2010.
    "PGR",
    # pioneer factor required for ER binding to chromatin: Carroll et al., Cell 2005.
    "FOXA1",
    # luminal gene cluster transcription factor: Perou et al., Nature 2000.
    "GATA3",
    # simple-epithelium (luminal) cytokeratin: Moll et al., Cell 1982 (catalogue of human cytokeratins).
    "KRT8",
    # simple-epithelium (luminal) cytokeratin, partner of KRT8: Moll et al., Cell 1982.
    "KRT18",
    # simple-epithelium cytokeratin expressed in breast carcinomas: Moll et al., Cell 1982.
    "KRT19",
    # epithelial cell adhesion molecule: Litvinov et al., J Cell Biol 1994.
    "EPCAM",
    # Ki-67 proliferation antigen: Gerdes et al., J Immunol 1984; in breast cancer: Dowsett et al., JNCI 2011.
    "MKI67",
)

# Synthetic demo data: the named genes driven by the tumour/immune/stroma programs (the generator's ground
# truth). The negative-control gene (driven by no program, unrelated to the image) is left out: it is not a
# marker and would only pull the marker mean towards 0.
SYNTHETIC_MARKERS: tuple[str, ...] = tuple(g for g, p in marker_genes().items() if p != NOISE_PROGRAM)

_FILE_SUFFIXES = {".txt", ".csv", ".tsv", ".list", ".genes"}


def _split_genes(text: str) -> list[str]:
    """Genes from text: one per line and/or comma-separated; `#` starts a comment; order kept, duplicates dropped."""
    genes: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        genes.extend(g.strip() for g in line.split(",") if g.strip())
    return list(dict.fromkeys(genes))


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or "\\" in spec or Path(spec).suffix.lower() in _FILE_SUFFIXES


def parse_markers(spec: str | None) -> list[str] | None:
    """Marker genes from a command-line value, or None when no value was given (use the defaults).

    `spec` is either a path to an existing text file (one gene per line and/or comma-separated, `#` comments),
    or a comma-separated gene list ("ERBB2,GRB7"). A value that looks like a path (contains a slash or ends in
    .txt/.csv/.tsv/.list/.genes) but does not exist raises InputFileError rather than being read as a gene name.
    """
    if spec is None:
        return None
    spec = spec.strip()
    if not spec:
        raise ConfigError("empty marker gene list")
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputFileError(f"cannot read marker gene file ({exc})", path=path) from exc
        genes = _split_genes(text)
        if not genes:
            raise InputFileError("marker gene file lists no genes", path=path)
        return genes
    if path.exists():
        raise InputFileError("marker gene list is not a regular file", path=path)
    if _looks_like_path(spec):
        raise InputFileError("marker gene file not found", path=path)
    genes = _split_genes(spec)
    if not genes:
        raise ConfigError(f"no genes in marker list {spec!r}")
    return genes


def is_synthetic_panel(gene_names: Sequence[str]) -> bool:
    """True when every gene is a synthetic demo gene (name starting with "SYN")."""
    names = [str(g) for g in gene_names]
    return bool(names) and all(g.startswith("SYN") for g in names)


def default_markers(gene_names: Sequence[str]) -> list[str]:
    """SYNTHETIC_MARKERS for a synthetic panel, BREAST_CANCER_MARKERS otherwise (not filtered to the panel)."""
    return list(SYNTHETIC_MARKERS if is_synthetic_panel(gene_names) else BREAST_CANCER_MARKERS)


# Breast cancer TUMOUR markers for the tumour score of `cmrcnet predict-slide` (evaluation/localisation.py):
# genes high in carcinoma cells and low in stroma, immune infiltrate and fat. Hormone receptors (ESR1, PGR) and
# MKI67 are left out: many HER2+ tumours are receptor-negative, and proliferation marks immune cells as well.
BREAST_TUMOUR_MARKERS: tuple[str, ...] = (
    # HER2, amplified and overexpressed in the tumour cells of HER2+ breast cancer: Slamon et al., Science 1987;
    # its expression follows the annotated tumour regions of the her2st sections: Andersson et al., Nat Commun 2021.
    "ERBB2",
    # on the ERBB2 amplicon, co-overexpressed with it in breast tumours: Stein et al., EMBO J 1994.
    "GRB7",
    # simple-epithelium cytokeratins retained in breast carcinoma cells: Moll et al., Cell 1982.
    "KRT8",
    "KRT18",
    "KRT19",
    # epithelial cell adhesion molecule, high in breast carcinomas: Spizzo et al., Breast Cancer Res Treat 2004
    # (Litvinov et al., J Cell Biol 1994 for its epithelial specificity).
    "EPCAM",
)

# Synthetic demo data: the genes driven by the tumour program (the generator's ground truth).
SYNTHETIC_TUMOUR_MARKERS: tuple[str, ...] = tuple(g for g, p in marker_genes().items() if p == "tumour")


def default_tumour_markers(gene_names: Sequence[str]) -> list[str]:
    """SYNTHETIC_TUMOUR_MARKERS for a synthetic panel, BREAST_TUMOUR_MARKERS otherwise (not filtered)."""
    return list(SYNTHETIC_TUMOUR_MARKERS if is_synthetic_panel(gene_names) else BREAST_TUMOUR_MARKERS)
