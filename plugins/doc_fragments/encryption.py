# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function
__metaclass__ = type


class ModuleDocFragment(object):
    """The O(encryption) option of the modules that create encrypted images (image, image_convert)."""

    DOCUMENTATION = r'''
options:
  encryption:
    description:
      - Encrypt the new image with LUKS, as qemu-img does (C(-f luks), or C(-f qcow2 -o encrypt.format=luks)).
        The image format must be V(luks) or V(qcow2); V(luks) needs this option.
      - Encryption is fixed when an image is made. The module's notes say what happens to an existing image
        that is not encrypted as asked.
      - The passphrase is never shown in results, diffs, action descriptions or messages. See C(docs/security.md).
    type: dict
    suboptions:
      format:
        description:
          - Encryption format.
        type: str
        choices: [luks]
        default: luks
      passphrase:
        description:
          - The passphrase (QEMU's C(key-secret)), used as given (UTF-8).
          - Exactly one of O(encryption.passphrase) and O(encryption.passphrase_file) is required.
        type: str
      passphrase_file:
        description:
          - A file on the managed host holding the passphrase, read when the module runs.
          - One trailing newline (LF or CR LF) is removed, so C(echo secret > file) works; QEMU's
            C(--object secret,file=) does not remove it (write the file with C(printf %s) for both).
        type: path
      cipher_alg:
        description:
          - Cipher algorithm of a new image (C(cipher-alg)); vdisk encrypts with V(aes-128) or V(aes-256).
          - Default V(aes-256).
        type: str
      cipher_mode:
        description:
          - Cipher mode of a new image (C(cipher-mode)), V(xts) or V(cbc). Default V(xts).
        type: str
      hash_alg:
        description:
          - Hash algorithm of the key derivation of a new image (C(hash-alg)). Default V(sha256).
        type: str
      iter_time:
        description:
          - Milliseconds spent in PBKDF2 when the key slot of a new image is made (C(iter-time)). Default 2000.
          - Not recorded in the image, so not compared with an existing one.
        type: int
'''
