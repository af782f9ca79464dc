#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: vdisk contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function
__metaclass__ = type

DOCUMENTATION = r"""
---
module: image
short_description: Create, resize, amend, replace or remove a virtual machine disk image
version_added: "0.1.0"
description:
  - Makes a disk image (qcow2, raw, ...) exist with the given format, size, create options and backing file,
    or makes sure it does not exist.
  - Runs on the managed host with the bundled vdisk engine and the Python standard library; qemu-img is not needed.
  - An existing image is changed in place where that keeps its data (growing, amending options such as
    C(compat), C(lazy_refcounts), C(refcount_bits) or the backing file); shrinking needs O(allow_shrink);
    a different format or a different option fixed at creation (such as C(cluster_size)) fails unless
    O(recreate) is set.
  - The decision what to change is the same as for the vdisk manifest (C(vdisk plan)), so a second run with
    the same arguments changes nothing.
requirements:
  - python >= 3.9
  - cryptography, only for O(encryption) and for an existing encrypted image (luks, or qcow2 with LUKS encryption).
  - backports.zstd on Python < 3.14, only for a qcow2 image with C(compression_type=zstd) (Python 3.14 has C(compression.zstd)).
author:
  - vdisk contributors (@vdisk)
options:
  path:
    description:
      - Path of the image file.
    type: path
    required: true
  state:
    description:
      - V(present) makes the image exist as described; V(absent) deletes the file.
      - An image in use by a running virtual machine (QEMU's image locks) is never replaced or deleted.
    type: str
    default: present
    choices: [present, absent]
  format:
    description:
      - Image format, as C(qemu-img -f) names it (C(qcow2), C(raw), ...).
    type: str
    default: qcow2
  size:
    description:
      - Virtual size in bytes or with a qemu-img suffix (V(20G), V(512M), V(1.5T)).
      - Needed to create an image unless O(backing_file) is given (then the size is the backing file's).
      - An existing image grows when this is larger; it shrinks only with O(allow_shrink=true).
      - Not given, an existing image keeps its size.
    type: raw
  preallocation:
    description:
      - Preallocation mode used when the image is created or grown (V(off), V(metadata) for qcow2,
        V(falloc), V(full)).
      - Not compared with an existing image.
      - The format's own choices apply (C(qemu-img create -o help)); an unquoted YAML V(off) is accepted.
    type: str
  backing_file:
    description:
      - Backing file of the image, as stored in it, so relative to the image's directory.
      - On an existing image a different backing file is set in place (as C(qemu-img rebase -u)), without
        copying data.
    type: str
  backing_format:
    description:
      - Format of O(backing_file). Detected and recorded when not given.
    type: str
  options:
    description:
      - Create options of the format, as C(qemu-img create -o) takes them, for example C(cluster_size),
        C(compat), C(lazy_refcounts), C(refcount_bits), C(extended_l2), C(compression_type) for qcow2.
      - Options that can be amended are changed in place; others fail on an existing image unless
        O(recreate=true).
      - C(size), C(backing_file), C(backing_fmt) and C(preallocation) have their own options.
    type: dict
    default: {}
  allow_shrink:
    description:
      - Allow making an existing image smaller. The data past the new end is lost.
    type: bool
    default: false
  recreate:
    description:
      - Replace an existing image whose format or fixed create options differ with a new empty image
        (written beside it and renamed into place). Its content and snapshots are lost.
    type: bool
    default: false
notes:
  - O(encryption) is fixed when an image is made. An existing plain image is not encrypted in place, nor an
    encrypted one decrypted, and the cipher suboptions must match the image's; each mismatch fails unless
    O(recreate=true) (then a new empty image replaces it).
  - On an existing encrypted image the passphrase is checked before anything is planned (a wrong one fails,
    in check mode too); growing or shrinking it needs the passphrase.
extends_documentation_fragment:
  - ansible.builtin.files
  - vdisk.images.encryption
  - vdisk.images.allowed_paths
  - vdisk.images.attributes
attributes:
  check_mode:
    support: full
    details: Predicts every change; nothing is written.
  diff_mode:
    support: full
    details: Shows the image's properties (format, virtual size, options, backing file, snapshots) before and after.
seealso:
  - module: vdisk.images.image_info
  - module: vdisk.images.image_convert
  - module: vdisk.images.image_snapshot
"""

EXAMPLES = r"""
- name: A 20 GiB qcow2 disk
  vdisk.images.image:
    path: /var/lib/libvirt/images/web.qcow2
    size: 20G
    owner: libvirt-qemu
    mode: "0600"

- name: Grow it to 40 GiB (a second run changes nothing)
  vdisk.images.image:
    path: /var/lib/libvirt/images/web.qcow2
    size: 40G

- name: An overlay on a golden image (size taken from the base)
  vdisk.images.image:
    path: /var/lib/libvirt/images/web-overlay.qcow2
    backing_file: golden/debian.qcow2
    backing_format: qcow2

- name: 128 KiB clusters and lazy refcounts
  vdisk.images.image:
    path: /srv/images/scratch.qcow2
    size: 8G
    preallocation: metadata
    options:
      cluster_size: 128K
      lazy_refcounts: true

- name: Turn a qcow2 into an empty raw disk of the same size (its content is lost)
  vdisk.images.image:
    path: /srv/images/scratch.qcow2
    format: raw
    recreate: true

- name: A LUKS-encrypted disk, its passphrase in a file only root can read
  vdisk.images.image:
    path: /srv/images/secret.luks
    format: luks
    size: 20G
    mode: "0600"
    encryption:
      passphrase_file: /etc/vdisk/secret.pass

- name: A qcow2 disk encrypted with LUKS, the passphrase from Ansible Vault
  vdisk.images.image:
    path: /srv/images/vault.qcow2
    size: 20G
    encryption:
      format: luks
      passphrase: "{{ vault_disk_passphrase }}"
      cipher_alg: aes-256
      iter_time: 2000

- name: Remove a disk
  vdisk.images.image:
    path: /srv/images/old.qcow2
    state: absent
"""

RETURN = r"""
image:
  description:
    - The image as C(vdisk info --output=json) (and C(qemu-img info --output=json)) shows it, after the
      changes; in check mode, as it is now. Empty when the image does not exist.
  returned: always
  type: dict
  sample:
    filename: /srv/images/web.qcow2
    format: qcow2
    virtual-size: 21474836480
    actual-size: 200704
    cluster-size: 65536
    dirty-flag: false
    format-specific:
      type: qcow2
      data: {compat: "1.1", compression-type: zlib, lazy-refcounts: false, refcount-bits: 16,
             corrupt: false, extended-l2: false}
actions:
  description:
    - The changes made (in check mode, the changes that would be made), in order; empty when nothing changed.
  returned: always
  type: list
  elements: dict
  contains:
    action:
      description: V(create), V(replace), V(delete), V(amend), V(grow), V(shrink).
      type: str
    path:
      description: The image.
      type: str
    description:
      description: What the action does, in words.
      type: str
    before:
      description:
        - The properties the action changes, before it. An encrypted image shows C(encryption) (its format
          and cipher, never the passphrase).
      type: dict
    after:
      description: The same properties after it.
      type: dict
  sample:
    - action: grow
      path: /srv/images/web.qcow2
      description: "grow /srv/images/web.qcow2: 20 GiB -> 40 GiB"
      before: {virtual-size: 21474836480}
      after: {virtual-size: 42949672960}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vdisk.images.plugins.module_utils.module_args import ENCRYPTION_SPEC, encryption_argument, module_policy
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.errors import ImageError
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.interrupt import Terminated, signals_raise
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.image import apply_image
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.spec import image_spec

SPEC_FIELDS = ("path", "state", "format", "size", "preallocation", "backing_file", "backing_format", "options",
               "allow_shrink", "recreate", "encryption")


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            format=dict(type="str", default="qcow2"),
            size=dict(type="raw"),
            preallocation=dict(type="str"),
            backing_file=dict(type="str"),
            backing_format=dict(type="str"),
            options=dict(type="dict", default={}),
            allow_shrink=dict(type="bool", default=False),
            recreate=dict(type="bool", default=False),
            encryption=encryption_argument(ENCRYPTION_SPEC),
            allowed_paths=dict(type="list", elements="path", default=[]),
        ),
        supports_check_mode=True,
        add_file_common_args=True,
    )
    params = module.params
    try:
        with signals_raise():      # killed (SIGTERM, SIGHUP): a new image's temporary file is removed
            spec = image_spec({name: params[name] for name in SPEC_FIELDS}, inline_secrets=True)
            result = apply_image(spec, module_policy(params["allowed_paths"]), check_mode=module.check_mode)
    except Terminated as exc:
        module.fail_json(msg="%s: %s" % (params["path"], exc))
    except ImageError as exc:
        module.fail_json(msg=str(exc))
    except OSError as exc:
        module.fail_json(msg="%s: %s" % (exc.filename or params["path"], exc.strerror or exc))

    changed = result.changed
    diff = {"before": result.before, "after": result.after}
    final = result.final
    if spec.state == "present" and final is not None and final.exists:
        file_args = module.load_file_common_arguments(params, path=spec.path)
        changed = module.set_fs_attributes_if_different(file_args, changed, diff)
    out = dict(changed=changed, image=final.info if final is not None and final.exists else {},
               actions=[action.to_dict() for action in result.actions])
    if module._diff:
        out["diff"] = diff
    module.exit_json(**out)


if __name__ == "__main__":
    main()
