"""``python -m ansible_collections.vdisk.images.plugins.module_utils.vdisk``: the vdisk command."""
import sys

from .cli.main import main

sys.exit(main())
