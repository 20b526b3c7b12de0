"""Allow ``python -m normtool``."""

from normtool.cli import main

main()
