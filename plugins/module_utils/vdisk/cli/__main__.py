"""``python -m ...vdisk.cli``: the vdisk command."""
from .main import main

if __name__ == "__main__":
    raise SystemExit(main())
