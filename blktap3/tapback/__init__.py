"""tapback: XenStore watch events -> per-VBD machines -> effects."""
