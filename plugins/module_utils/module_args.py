# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Argument specs and policies the modules share (their docs: doc_fragments/encryption.py)."""
from __future__ import absolute_import, division, print_function
__metaclass__ = type

import os

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.driver import Policy

# what unlocks an encrypted image (state.encryption reads it)
SOURCE_ENCRYPTION_SPEC = dict(
    format=dict(type="str", default="luks", choices=["luks"]),
    passphrase=dict(type="str", no_log=True),
    passphrase_file=dict(type="path", no_log=False),
)
# ... and how a new one is encrypted
ENCRYPTION_SPEC = dict(
    SOURCE_ENCRYPTION_SPEC,
    cipher_alg=dict(type="str"),
    cipher_mode=dict(type="str"),
    hash_alg=dict(type="str"),
    iter_time=dict(type="int"),
)


def encryption_argument(options):
    """The dict option for *options* (ENCRYPTION_SPEC or SOURCE_ENCRYPTION_SPEC): one passphrase source."""
    return dict(type="dict", options=options, mutually_exclusive=[("passphrase", "passphrase_file")],
                required_one_of=[("passphrase", "passphrase_file")])


def module_policy(allowed_paths):
    """The engine's safety policy widened by O(allowed_paths) (real paths, as the CLI's --allow-path)."""
    return Policy(allowed_dirs=tuple(os.path.realpath(d) for d in allowed_paths or ()))
