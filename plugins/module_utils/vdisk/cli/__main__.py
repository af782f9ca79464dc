"""``python -m ...vdisk.cli``: the vdisk command."""
import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
