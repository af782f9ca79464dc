"""``python -m ansible_collections.vdisk.images.plugins.module_utils.vdisk``: the vdisk command."""
from .cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
