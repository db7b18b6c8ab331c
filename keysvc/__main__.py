"""``python -m keysvc``."""

import sys

from .cli import main

sys.exit(main())
