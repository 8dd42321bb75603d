"""Declarative state machines: specs loader, machines, events, effects. No I/O."""
