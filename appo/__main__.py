"""``python -m appo``: the same as ``appo-train``."""

import sys

from appo.cli import main

sys.exit(main())
