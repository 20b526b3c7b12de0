"""What the tests and the benchmark scripts share: model factories, the transforms' error
cases, the reader's fuzzing property, running and measuring processes, publishing results.

Not product code: it is not installed with normtool and normtool never imports it. It is found
from the repository root, which pytest puts on ``sys.path`` (``tests`` is a package there) and
each script puts there before importing it.
"""
