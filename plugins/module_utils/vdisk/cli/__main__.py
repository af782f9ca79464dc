"""``python -m ...vdisk.cli``: the vdisk command."""
import sys

from .main import main

sys.exit(main())
