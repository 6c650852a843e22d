"""`python -m kew`: the kew command."""

import sys

from kew.cli import main

if __name__ == "__main__":
    sys.exit(main())
