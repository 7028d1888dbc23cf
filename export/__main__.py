"""``python -m ldm_engine.export``: see ``--help``."""

import sys

from .cli import main

sys.exit(main())
