"""`python -m blktap3.tapdisk`: the tapdisk command (tap-ctl spawn runs it this way)."""

import sys

# A tapdisk never speaks TLS, but asyncio, which structlog and transitions' extensions
# import and we never run, loads the ssl module and with it OpenSSL: 1.3 MB of RSS of
# every tapdisk (one per VBD on many hosts) is ssl's own. Refused here, asyncio goes
# without it.
# Only in this entry (the process is a tapdisk and nothing else); an importer of
# blktap3.tapdisk.main keeps its ssl.
sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]

from .main import main  # noqa: E402 - after the line above, which must come first

raise SystemExit(main())
