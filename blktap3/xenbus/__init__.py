"""XenStore access: pyxs wrapper, xenbus states, vbd3 path and key schemas."""
