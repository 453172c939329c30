"""Speed of training, patch encoding, retrieval and whole-slide prediction, each against the machine's limit.

    python benchmarks/speed.py [--quick] [--sections peak,train,inference,retrieval,slide] [--out PATH]

The benchmark is the package `benchmarks/speed/` (one module per section and one report writer; its docstring
says what each section measures); this file runs it, as does `python -m benchmarks.speed` from the repository root.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the package speed/ beside this file

from speed.main import main

if __name__ == "__main__":
    main()
