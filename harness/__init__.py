"""harness: a declarative, pytest-style experiment harness for LM interpretability."""

__version__ = "0.1.0"
