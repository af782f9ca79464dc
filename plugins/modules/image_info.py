#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: vdisk contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function
__metaclass__ = type

DOCUMENTATION = r"""
---
module: image_info
short_description: Read a disk image's properties, as qemu-img info does
version_added: "0.1.0"
description:
  - Returns what C(qemu-img info --output=json) returns for an image (format, virtual size, allocated size,
    cluster size, backing file, snapshots, format-specific data), with the same keys.
  - With O(backing_chain=true), returns every image of the backing chain.
  - Opens images read-only and never changes anything; qemu-img is not needed on the host.
requirements:
  - python >= 3.9 (reading an image's properties needs no other package, encrypted and
    zstd-compressed images included).
author:
  - vdisk contributors (@vdisk)
options:
  path:
    description:
      - Path of the image file.
    type: path
    required: true
  format:
    description:
      - Format of the image. Detected from its content when not given.
    type: str
  backing_chain:
    description:
      - Return the whole backing chain, top image first, in RV(images).
      - Backing files are opened only inside the image's own directory tree and the directories of
        O(allowed_paths).
    type: bool
    default: false
  safety_check:
    description:
      - Inspect the image as C(vdisk inspect) does before reading it and return the report in RV(safety), with
        the detected format, the formats the content is valid as, every file the image names with the
        policy's verdict, and the named checks.
      - The task fails, with RV(safety) in its result, when a check fails (an image that names a file
        outside the allowed directories, a polyglot, a declared format that is not the detected one,
        a header beyond the format's limits, a device or FIFO).
    type: bool
    default: false
extends_documentation_fragment:
  - vdisk.images.allowed_paths
  - vdisk.images.attributes
attributes:
  check_mode:
    support: full
    details: Reads only; the result is the same in check mode.
  diff_mode:
    support: none
    details: Changes nothing, so there is no diff.
seealso:
  - module: vdisk.images.image
"""

EXAMPLES = r"""
- name: Read a disk's properties
  vdisk.images.image_info:
    path: /var/lib/libvirt/images/web.qcow2
  register: disk

- name: Show its virtual size
  ansible.builtin.debug:
    msg: "{{ disk.image['virtual-size'] | human_readable }}"

- name: Vet an uploaded image before anything else touches it
  vdisk.images.image_info:
    path: /srv/uploads/tenant-disk.qcow2
    format: qcow2
    safety_check: true
  register: vetted

- name: Read an overlay and its backing files
  vdisk.images.image_info:
    path: /var/lib/libvirt/images/web-overlay.qcow2
    backing_chain: true
  register: chain
"""

RETURN = r"""
image:
  description:
    - The image, keys as in C(qemu-img info --output=json) (C(filename), C(format), C(virtual-size),
      C(actual-size), C(cluster-size), C(dirty-flag), C(backing-filename), C(full-backing-filename),
      C(backing-filename-format), C(snapshots), C(format-specific)).
    - With O(backing_chain=true), the top image (the first of RV(images)).
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
images:
  description:
    - Every image of the backing chain, top first, each as RV(image).
  returned: when O(backing_chain=true)
  type: list
  elements: dict
safety:
  description:
    - The C(vdisk inspect --output=json) report, keys C(filename), C(format), C(declared-format),
      C(format-matches), C(references) (each C(image), C(kind), C(name), C(path), C(allowed), C(followed),
      C(problem)), C(checks) (each C(name), C(passed), C(detail)) and C(safe).
  returned: when O(safety_check=true)
  type: dict
  sample:
    filename: /srv/uploads/tenant-disk.qcow2
    format: qcow2
    declared-format: qcow2
    format-matches: [qcow2]
    references: []
    checks:
      - {name: regular-file, passed: true, detail: a regular file}
    safe: true
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.driver import Policy

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.errors import ImageError
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import close_chain, open_image
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.info import chain_info, image_info
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.inspect import inspect_image
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import get_driver


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            format=dict(type="str"),
            backing_chain=dict(type="bool", default=False),
            allowed_paths=dict(type="list", elements="path", default=[]),
            safety_check=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    params = module.params
    path = params["path"]
    policy = Policy(allowed_dirs=tuple(os.path.realpath(d) for d in params["allowed_paths"] or ()))
    safety = None
    try:
        if params["format"]:
            get_driver(params["format"])
        if params["safety_check"]:
            safety = inspect_image(path, params["format"], policy).to_json()
            if not safety["safe"]:
                module.fail_json(msg="%s: failed safety checks: %s" % (
                    path, ", ".join(c["name"] for c in safety["checks"] if not c["passed"])), safety=safety)
        image = open_image(path, params["format"], writable=False, policy=policy, backing=params["backing_chain"])
        try:
            infos = chain_info(image) if params["backing_chain"] else [image_info(image)]
        finally:
            close_chain(image)
    except ImageError as exc:
        module.fail_json(msg=str(exc))
    except OSError as exc:
        module.fail_json(msg="%s: %s" % (exc.filename or path, exc.strerror or exc))
    out = dict(changed=False, image=infos[0])
    if params["backing_chain"]:
        out["images"] = infos
    if safety is not None:
        out["safety"] = safety
    module.exit_json(**out)


if __name__ == "__main__":
    main()
