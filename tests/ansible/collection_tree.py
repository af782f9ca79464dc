"""Lay the collection out where ansible-test needs it: DEST/ansible_collections/vdisk/images.

ansible-test runs only inside ``.../ansible_collections/<namespace>/<name>/``. This copies what
``ansible-galaxy collection build`` would ship -- the files git knows (tracked, or new and not
ignored by .gitignore) minus galaxy.yml's ``build_ignore`` -- to that path, and prints the path.

A copy, not symlinks: ansible-test resolves its working directory and does not descend into
symlinked directories. The copy gets an empty git repository of its own, because ansible-test
lists the content of the nearest enclosing git work tree, which would otherwise be this
repository, where the copy (under tests/output/) is ignored.

Usage: python tests/ansible/collection_tree.py DEST
"""
from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys

import yaml

COLLECTION = ('vdisk', 'images')


def source_files(root):
    """Relative paths of the files git would commit (or of every file outside a git work tree)."""
    try:
        out = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
                             cwd=root, check=True, capture_output=True).stdout
        names = [name for name in out.decode().split('\0') if name]
    except (OSError, subprocess.CalledProcessError):
        names = []
        for directory, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in ('.git', '.venv', '__pycache__', 'output', 'demo')]
            names.extend(os.path.relpath(os.path.join(directory, f), root) for f in files)
    return [name for name in names if os.path.isfile(os.path.join(root, name))]


def ignored(name, patterns):
    """ansible-galaxy's build_ignore: fnmatch on the path of the file or of any directory above it."""
    parts = name.split('/')
    candidates = ['/'.join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatch(c, p) for c in candidates for p in patterns)


def main(argv):
    if len(argv) != 2:
        sys.stderr.write(__doc__.strip().splitlines()[-1] + '\n')
        return 2
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    dest = os.path.join(os.path.abspath(argv[1]), 'ansible_collections', *COLLECTION)
    with open(os.path.join(root, 'galaxy.yml'), encoding='utf-8') as f:
        patterns = yaml.safe_load(f).get('build_ignore') or []
    if os.path.exists(dest):
        shutil.rmtree(dest)
    for name in source_files(root):
        if ignored(name, patterns):
            continue
        target = os.path.join(dest, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(root, name), target)
    subprocess.run(['git', 'init', '-q', dest], check=True)
    # ansible-test's own output stays out of the files it tests: the copy, like the tarball, has no
    # .gitignore (build_ignore), so git is told to ignore tests/output/ here
    os.makedirs(os.path.join(dest, '.git', 'info'), exist_ok=True)
    with open(os.path.join(dest, '.git', 'info', 'exclude'), 'a', encoding='utf-8') as f:
        f.write('/tests/output/\n')
    print(dest)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
