"""Tools: state-diagram export, benchmarks, the FSM conformance harness."""
