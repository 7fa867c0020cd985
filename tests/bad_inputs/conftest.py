"""The corpus of malformed specs is data for tests/test_bad_inputs.py, not specs to run:
keep the harness pytest plugin (which collects every spec YAML it is pointed at) away from it."""

collect_ignore_glob = ["*.yaml"]
