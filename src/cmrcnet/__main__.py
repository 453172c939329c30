"""`python -m cmrcnet` runs the command-line interface."""

import sys

from cmrcnet.cli import main

sys.exit(main())
