"""Machine specs as data (read by blktap3.fsm, the diagram tool and the harness)."""
