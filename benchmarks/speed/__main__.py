"""`python -m benchmarks.speed` (from the repository root): see the package docstring."""

from .main import main

main()
