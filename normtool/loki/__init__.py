"""Loki heads (Roberts et al., NeurIPS 2023): predict the Fréchet mean of a classifier's output
distribution under a metric over the label space, so a model can predict labels it never saw.

Modules: ``tree`` (LCA depths for hop distances without an N×N matrix), ``metric`` (the three
metric kinds), ``metric_files`` (reading and validating metric files), ``labels`` (label space
and the class-index → label map), ``head`` (the graph pass), ``evaluate`` (``--eval``).
"""
