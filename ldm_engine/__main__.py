"""``python -m ldm_engine generate ...``: see ldm_engine.cli."""

import sys

from ldm_engine.cli import main

sys.exit(main())
