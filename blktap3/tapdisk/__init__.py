"""The tapdisk process: control server, VBD objects, data-path threads."""
