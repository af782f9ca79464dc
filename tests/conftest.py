"""Test set-up shared by every suite.

Makes the engine importable as ``ansible_collections.vdisk.images`` straight from the
source tree (a symlink tree in a temporary directory on ``sys.path`` and in
``PYTHONPATH`` for the CLI subprocesses), and insists that the qemu-img oracle is
installed: a missing qemu-img is an error, never a silent skip.
"""
import hashlib
import os
import shutil
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _source_tree_on_path() -> str:
    # one tree per checkout: two clones tested at once (a fresh clone beside the working tree)
    # must not re-point each other's link
    tag = hashlib.sha1(REPO.encode()).hexdigest()[:12]
    root = os.path.join(tempfile.gettempdir(), "vdisk-src-%d-%s" % (os.getuid(), tag))
    link = os.path.join(root, "ansible_collections", "vdisk", "images")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if not (os.path.islink(link) and os.readlink(link) == REPO):
        tmp = "%s.%d" % (link, os.getpid())
        os.symlink(REPO, tmp)
        os.replace(tmp, link)
    return root


_ROOT = _source_tree_on_path()
sys.path.insert(0, _ROOT)
for _name in [m for m in sys.modules if m == "ansible_collections" or m.startswith("ansible_collections.")]:
    del sys.modules[_name]
os.environ["PYTHONPATH"] = os.pathsep.join([_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(
    os.pathsep) if p])

# the modules' unit tests need ansible-core: ``ansible-test units`` runs them (make test does);
# the engine's suite, which runs without Ansible, does not collect them rather than skip them
try:
    import ansible.module_utils.basic  # noqa: F401  pylint: disable=unused-import
except ImportError:
    collect_ignore = ["unit/plugins"]


def pytest_sessionstart(session):
    missing = [tool for tool in ("qemu-img", "qemu-io") if shutil.which(tool) is None]
    if missing:
        raise pytest.UsageError("the qemu-img oracle is missing (%s): install Debian's qemu-utils "
                                "(make test does)" % ", ".join(missing))


def pytest_report_header(config):
    return "vdisk crash-test seed: %s (VDISK_CRASH_SEED), model examples: %s (VDISK_MODEL_EXAMPLES)" % (
        os.environ.get("VDISK_CRASH_SEED", "20261125"), os.environ.get("VDISK_MODEL_EXAMPLES", "default"))

# the local http server of the download tests, as the fixture ``server``
from http_server import server  # noqa: E402,F401  pylint: disable=unused-import,wrong-import-position
