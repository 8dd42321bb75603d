"""`python -m blktap3.tapback`: the same as the `tapback` command."""

from .main import main

raise SystemExit(main())
