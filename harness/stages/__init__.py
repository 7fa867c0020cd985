"""The pipeline's stages, in the order a run executes them:

data → conditions (generate) → capture (forward + metrics) → stats → criteria → report.

Each module owns one stage: its spec inputs, its cache key, its work units and how to
compute one unit (see `harness.executor`). The runner only sequences them.
"""
