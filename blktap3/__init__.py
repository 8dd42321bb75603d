"""blktap3: a user-space Xen block back-end (tapback, tapdisk, tap-ctl) in Python."""

__version__ = "0.1.0"
