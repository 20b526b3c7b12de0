"""normtool: exact, verified post-hoc rewrites of trained neural networks."""

__version__ = "0.1.0"
