"""``python -m blktap3.torture`` is ``blktap3-torture``."""

import sys

from .cli import main

sys.exit(main())
