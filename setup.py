"""Packaging: the repository root *is* the collection, installed as ansible_collections.vdisk.images."""
import os

from setuptools import setup

PREFIX = "ansible_collections.vdisk.images"


def packages():
    found = [PREFIX]
    for directory, dirs, _files in os.walk("plugins"):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        found.append(PREFIX + "." + directory.replace(os.sep, "."))
    return found


def collection_files():
    """Non-Python collection content (galaxy.yml, meta, roles, playbooks, docs) and engine data files."""
    out = ["galaxy.yml", "README.md"]
    for top in ("meta", "roles", "playbooks", "docs", "plugins"):
        for directory, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            out.extend(os.path.join(directory, f) for f in files if not f.endswith((".py", ".pyc")))
    return out


setup(packages=packages(), package_dir={PREFIX: "."}, package_data={PREFIX: collection_files()})
