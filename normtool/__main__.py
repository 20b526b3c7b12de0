"""Allow ``python -m normtool``."""

from normtool.launch import main

main()
