"""`python -m blktap3.tapdisk`: the tapdisk command (tap-ctl spawn runs it this way)."""

from .main import main

raise SystemExit(main())
