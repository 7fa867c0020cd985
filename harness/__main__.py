"""`python -m harness` (also what `accelerate launch -m harness run SPEC` runs)."""

import sys

from harness.cli import main

sys.exit(main())
