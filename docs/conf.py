"""Sphinx configuration of the API reference (built in CI with warnings as errors: `sphinx-build -W`)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

project = "cmrcnet"
author = "cmrcnet developers"
extensions = ["sphinx.ext.autodoc", "numpydoc"]
numpydoc_show_class_members = False
numpydoc_xref_param_type = False
autodoc_typehints = "none"  # the numpydoc sections say what each parameter is
autodoc_member_order = "bysource"
exclude_patterns = ["_build", "tutorial.py"]
html_theme = "alabaster"
