"""``python -m trainwell``: the command-line tool."""

import sys

from trainwell.cli import main

if __name__ == "__main__":
    sys.exit(main())
