#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: vdisk contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function
__metaclass__ = type

DOCUMENTATION = r"""
---
module: image_snapshot
short_description: Create, delete or revert to an internal snapshot of a disk image
version_added: "0.1.0"
description:
  - Manages one internal snapshot of an image in a format that has them (qcow2), as
    C(qemu-img snapshot -c), C(-d) and C(-a) do.
  - V(applied) reverts the image's active layer to the snapshot, and changes nothing when the active layer
    already holds the snapshot's content (compared with the engine; unchanged clusters are not even read).
  - Never use it on the disk of a running virtual machine; QEMU's image locks make it fail then.
requirements:
  - python >= 3.9
  - backports.zstd on Python < 3.14, only for O(state=applied) on a qcow2 image with zstd-compressed clusters
    (Python 3.14 has C(compression.zstd)).
author:
  - vdisk contributors (@vdisk)
options:
  path:
    description:
      - Path of the image file.
    type: path
    required: true
  name:
    description:
      - Name of the snapshot.
    type: str
    required: true
  state:
    description:
      - V(present) creates the snapshot if there is none of that name.
      - V(absent) deletes it if there is one.
      - V(applied) reverts the image to it (the snapshot must exist); the current content is lost.
    type: str
    default: present
    choices: [present, absent, applied]
extends_documentation_fragment:
  - vdisk.images.allowed_paths
  - vdisk.images.attributes
attributes:
  check_mode:
    support: full
    details: Predicts the change; nothing is written.
  diff_mode:
    support: full
    details: Shows the image's snapshot names (and, for V(applied), the active layer's relation to the snapshot) before and after.
seealso:
  - module: vdisk.images.image
"""

EXAMPLES = r"""
- name: Take a snapshot before upgrading the guest
  vdisk.images.image_snapshot:
    path: /var/lib/libvirt/images/web.qcow2
    name: before-upgrade

- name: Go back to it
  vdisk.images.image_snapshot:
    path: /var/lib/libvirt/images/web.qcow2
    name: before-upgrade
    state: applied

- name: Drop it
  vdisk.images.image_snapshot:
    path: /var/lib/libvirt/images/web.qcow2
    name: before-upgrade
    state: absent
"""

RETURN = r"""
snapshots:
  description:
    - The image's internal snapshots afterwards (in check mode, as they are now), keys as in
      C(qemu-img info --output=json).
  returned: always
  type: list
  elements: dict
  sample:
    - id: "1"
      name: before-upgrade
      vm-state-size: 0
      date-sec: 1764000000
      date-nsec: 0
      vm-clock-sec: 0
      vm-clock-nsec: 0
actions:
  description: The change made (or, in check mode, that would be made); empty when nothing changed.
  returned: always
  type: list
  elements: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vdisk.images.plugins.module_utils.module_args import module_policy
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.errors import ImageError
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.apply import apply
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.content import snapshot_matches_active
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.observe import observe
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.plan import plan_snapshot


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            name=dict(type="str", required=True),
            state=dict(type="str", default="present", choices=["present", "absent", "applied"]),
            allowed_paths=dict(type="list", elements="path", default=[]),
        ),
        supports_check_mode=True,
    )
    path, name, state = module.params["path"], module.params["name"], module.params["state"]
    policy = module_policy(module.params["allowed_paths"])
    try:
        observed = observe(path, policy=policy)
        actions = plan_snapshot(observed, name, state,
                                lambda: snapshot_matches_active(path, name, observed.format, policy))
        final = observed
        if actions and not module.check_mode:
            apply(actions, policy)
            final = observe(path, policy=policy)
    except ImageError as exc:
        module.fail_json(msg=str(exc))
    except OSError as exc:
        module.fail_json(msg="%s: %s" % (exc.filename or path, exc.strerror or exc))
    out = dict(changed=bool(actions), snapshots=final.snapshots, actions=[a.to_dict() for a in actions])
    if module._diff:
        before = {"path": path, "snapshots": observed.snapshot_names}
        after = dict(before)
        for action in actions:
            after.update(action.after)
            before.update(action.before)
        out["diff"] = {"before": before, "after": after}
    module.exit_json(**out)


if __name__ == "__main__":
    main()
