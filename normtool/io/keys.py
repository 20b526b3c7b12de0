"""The safetensors metadata keys under which a normtool checkpoint keeps its graph and history.

Plain strings at the bottom layer: the readers (``normtool.load``), the writers (``normtool.save``,
``normtool.export``) and the format-level helpers in ``normtool.io`` must agree on them, and io
may not import the layers above it.
"""

GRAPH_KEY = "normtool.graph"
HISTORY_KEY = "normtool.history"
VERSION_KEY = "normtool.version"
