#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: vdisk contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function
__metaclass__ = type

DOCUMENTATION = r"""
---
module: image_convert
short_description: Convert a disk image into another format or layout, as qemu-img convert does
version_added: "0.1.0"
description:
  - Writes the guest content of O(src) into a new image O(dest) of format O(format) with the create
    O(options), optionally compressed, from an internal snapshot of the source, or on top of a backing file.
  - The destination is written beside its final path and renamed into place, so it is always either the old
    file or the complete new one.
  - With O(on_exists=compare) (the default) an existing destination that already is O(format) with
    O(options) and the backing file asked for, has the source's size and holds the source's content is
    left alone (V(changed=false)); otherwise it is rewritten.
  - Runs on the managed host with the bundled vdisk engine; qemu-img is not needed.
requirements:
  - python >= 3.9
  - cryptography, only for an encrypted source or destination (O(source_encryption), O(encryption)).
  - backports.zstd on Python < 3.14, only for zstd-compressed qcow2 clusters (reading them, or writing with
    C(compression_type=zstd)); Python 3.14 has C(compression.zstd).
author:
  - vdisk contributors (@vdisk)
options:
  src:
    description:
      - Path of the source image. Opened read-only.
    type: path
    required: true
  src_format:
    description:
      - Format of the source image. Detected from its content when not given.
    type: str
  dest:
    description:
      - Path of the image to write.
    type: path
    required: true
  format:
    description:
      - Format of the destination, as C(qemu-img convert -O) names it.
    type: str
    default: qcow2
  options:
    description:
      - Create options of the destination format, as C(qemu-img convert -o) takes them (for example
        C(cluster_size), C(compat), C(lazy_refcounts), C(preallocation) for qcow2).
      - Compared with an existing destination where the image records them.
    type: dict
    default: {}
  compress:
    description:
      - Write compressed clusters (C(qemu-img convert -c)); the format must support compression.
      - Not compared with an existing destination (compression is how data is stored, not what it is).
    type: bool
    default: false
  snapshot:
    description:
      - Convert this internal snapshot of the source instead of its current content
        (C(qemu-img convert -l); a name or id, or C(snapshot.name=NAME) / C(snapshot.id=ID)).
    type: str
  backing_file:
    description:
      - Give the destination this backing file and store only what differs from it (C(qemu-img convert -B)).
      - Relative to the destination's directory, as stored in the image.
    type: str
  on_exists:
    description:
      - What to do when O(dest) exists.
      - V(compare) leaves it alone when it already holds the source's content in the requested format and
        options, else rewrites it.
      - V(skip) leaves any existing file alone.
      - V(replace) always rewrites it.
    type: str
    default: compare
    choices: [compare, skip, replace]
  source_encryption:
    description:
      - The passphrase of an encrypted O(src) (a luks image, or a qcow2 image with LUKS encryption), as
        C(qemu-img convert --object secret,... --image-opts driver=luks,key-secret=...) takes it.
      - Required when O(src) is encrypted; the source's own header tells how it is encrypted.
    type: dict
    suboptions:
      format:
        description:
          - Encryption format of the source.
        type: str
        choices: [luks]
        default: luks
      passphrase:
        description:
          - The passphrase, used as given (UTF-8).
          - Exactly one of O(source_encryption.passphrase) and O(source_encryption.passphrase_file) is required.
        type: str
      passphrase_file:
        description:
          - A file on the managed host holding the passphrase; one trailing newline (LF or CR LF) is removed.
        type: path
notes:
  - With O(on_exists=compare), an existing destination that is not encrypted as O(encryption) asks (plain,
    or another cipher) is rewritten; one that is opens with that passphrase to compare its content.
extends_documentation_fragment:
  - ansible.builtin.files
  - vdisk.images.encryption
  - vdisk.images.allowed_paths
  - vdisk.images.attributes
attributes:
  check_mode:
    support: full
    details: Predicts the conversion (the comparison still reads both images); nothing is written.
  diff_mode:
    support: full
    details: Shows the destination's properties (format, virtual size, options, backing file) before and after.
seealso:
  - module: vdisk.images.image
  - module: vdisk.images.image_info
"""

EXAMPLES = r"""
- name: A compressed qcow2 copy of a raw disk (a second run compares and changes nothing)
  vdisk.images.image_convert:
    src: /srv/build/disk.raw
    src_format: raw
    dest: /srv/images/golden.qcow2
    format: qcow2
    compress: true
    options:
      cluster_size: 128K

- name: A raw copy of a qcow2 snapshot, made once
  vdisk.images.image_convert:
    src: /srv/images/web.qcow2
    snapshot: before-upgrade
    dest: /srv/export/web.raw
    format: raw
    on_exists: skip
    mode: "0640"

- name: A LUKS-encrypted copy of a golden image
  vdisk.images.image_convert:
    src: /srv/images/golden.qcow2
    dest: /srv/images/secret.luks
    format: luks
    mode: "0600"
    encryption:
      passphrase_file: /etc/vdisk/secret.pass

- name: A plain qcow2 copy of an encrypted image
  vdisk.images.image_convert:
    src: /srv/images/secret.luks
    source_encryption:
      passphrase: "{{ vault_disk_passphrase }}"
    dest: /srv/export/plain.qcow2
"""

RETURN = r"""
image:
  description:
    - The destination as C(vdisk info --output=json) (and C(qemu-img info --output=json)) shows it, after the
      conversion; in check mode, as it is now (empty when it does not exist).
  returned: always
  type: dict
  sample:
    filename: /srv/images/golden.qcow2
    format: qcow2
    virtual-size: 8589934592
    actual-size: 1073741824
    cluster-size: 131072
actions:
  description: The conversion made (or, in check mode, that would be made); empty when nothing changed.
  returned: always
  type: list
  elements: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vdisk.images.plugins.module_utils.module_args import ENCRYPTION_SPEC, SOURCE_ENCRYPTION_SPEC, encryption_argument, module_policy
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.errors import ImageError, InvalidOption
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.interrupt import Terminated, signals_raise
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import get_driver
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.apply import apply
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.content import converted_content_matches
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.encryption import parse_encryption, reserved_options
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.observe import observe
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.plan import plan_convert, predict, properties

# set through their own options (or taken from the source)
NOT_IN_OPTIONS = {"size": "the source's size", "backing_file": "the backing_file option",
                  "backing_fmt": "the backing_file option (the format is detected)"}


def typed_options(fmt, options, dest):
    """The destination format's create options, validated and typed (errors name the option)."""
    driver = get_driver(fmt)
    own = dict(NOT_IN_OPTIONS, **{k: "the option %s" % v for k, v in reserved_options(fmt).items()})
    for name in options:
        if name in own:
            raise InvalidOption("'%s' is not taken in options: use %s" % (name, own[name]), path=dest, field=name)
    try:
        return driver.parse_options({k: v for k, v in options.items() if v is not None})
    except ImageError as exc:
        raise InvalidOption("%s (format %s)" % (exc.message, fmt), path=dest, field=exc.field) from None


def main():
    module = AnsibleModule(
        argument_spec=dict(
            src=dict(type="path", required=True),
            src_format=dict(type="str"),
            dest=dict(type="path", required=True),
            format=dict(type="str", default="qcow2"),
            options=dict(type="dict", default={}),
            compress=dict(type="bool", default=False),
            snapshot=dict(type="str"),
            backing_file=dict(type="str"),
            on_exists=dict(type="str", default="compare", choices=["compare", "skip", "replace"]),
            encryption=encryption_argument(ENCRYPTION_SPEC),
            source_encryption=encryption_argument(SOURCE_ENCRYPTION_SPEC),
            allowed_paths=dict(type="list", elements="path", default=[]),
        ),
        supports_check_mode=True,
        add_file_common_args=True,
    )
    p = module.params
    src, dest, fmt = p["src"], p["dest"], p["format"]
    policy = module_policy(p["allowed_paths"])
    try:
        with signals_raise():      # killed (SIGTERM, SIGHUP): the temporary output is removed
            options = typed_options(fmt, p["options"] or {}, dest)
            encryption = parse_encryption(p["encryption"], dest)
            source_encryption = parse_encryption(p["source_encryption"], src, name="source_encryption", source=True)
            if fmt == "luks" and encryption is None:
                raise InvalidOption("format luks needs encryption (its passphrase or passphrase_file)", path=dest,
                                    field="encryption")
            if p["src_format"]:
                get_driver(p["src_format"])
            if p["compress"] and "compression" not in get_driver(fmt).capabilities:
                raise InvalidOption("format %s does not support compression" % fmt, path=dest, field="compress")
            source = observe(src, p["src_format"], policy)
            if not source.exists:
                raise ImageError("Could not open '%s': No such file or directory" % src, path=src, field="src")
            target = observe(dest, policy=policy)
            actions = plan_convert(
                source, target, fmt, options, p["on_exists"], p["compress"], p["backing_file"], p["src_format"],
                p["snapshot"],
                same_content=lambda: converted_content_matches(src, dest, source.format, fmt, p["snapshot"], policy,
                                                               source_encryption, encryption),
                encryption=encryption, source_encryption=source_encryption)
            final = target
            if actions and not module.check_mode:
                apply(actions, policy)
                final = observe(dest, policy=policy)
    except Terminated as exc:
        module.fail_json(msg="%s: %s" % (dest, exc))
    except ImageError as exc:
        module.fail_json(msg=str(exc))
    except OSError as exc:
        module.fail_json(msg="%s: %s" % (exc.filename or dest, exc.strerror or exc))

    changed = bool(actions)
    before = properties(target)
    diff = {"before": before, "after": properties(final) if actions and not module.check_mode
            else predict(before, actions)}
    if final.exists:
        file_args = module.load_file_common_arguments(p, path=dest)
        changed = module.set_fs_attributes_if_different(file_args, changed, diff)
    out = dict(changed=changed, image=final.info if final.exists else {}, actions=[a.to_dict() for a in actions])
    if module._diff:
        out["diff"] = diff
    module.exit_json(**out)


if __name__ == "__main__":
    main()
