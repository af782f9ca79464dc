#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: vdisk contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function
__metaclass__ = type

DOCUMENTATION = r"""
---
module: manifest
short_description: Make a list of disk images exist as a vdisk manifest describes them
version_added: "0.2.0"
description:
  - Plans and applies a whole vdisk manifest (its C(images) list and C(defaults)) in one call, as
    C(vdisk plan) and C(vdisk apply) do.
  - Images are made, grown, amended, converted from a source, put on a backing file, snapshotted or
    deleted, in dependency order (backing files and sources first, whatever the order of the list).
  - Check mode predicts the images this run makes, so an overlay sized by a base made in the same run, or
    snapshots of an image not made yet, are planned on an empty directory without writing anything.
  - The images are validated with the engine's checks of C(vdisk validate) (formats, create options, sizes,
    paths, duplicates, dependencies), naming the image and the field; every problem is reported at once and
    nothing is changed. Their structure is checked by the module's argument spec; the manifest file's JSON
    Schema is applied to O(src) only.
  - Applying stops at the first failed action and reports what was done, what failed and what was not done.
  - Runs on the managed host with the bundled vdisk engine and the Python standard library; qemu-img is not needed.
    O(src) also needs the Python packages PyYAML and jsonschema there (to read and check the file); without
    them the module fails with one line naming the package.
requirements:
  - python >= 3.9
  - PyYAML and jsonschema, only with O(src) (to read and check the manifest file).
  - cryptography, only for images with C(encryption).
  - backports.zstd on Python < 3.14, only for zstd-compressed qcow2 images (made with C(compression_type=zstd),
    or a C(source) with zstd-compressed clusters); Python 3.14 has C(compression.zstd).
author:
  - vdisk contributors (@vdisk)
options:
  images:
    description:
      - The images, each a dict with the fields of a manifest's C(images) entry (C(path), C(state),
        C(format), C(size), C(preallocation), C(options), C(backing_file), C(backing_format),
        C(snapshots), C(prune_snapshots), C(source), C(source_checksum), C(source_format), C(compress),
        C(allow_shrink), C(recreate), C(encryption), C(owner), C(group), C(mode)). See C(docs/manifest.md).
      - C(encryption) (C(format=luks), C(passphrase_file), C(cipher_alg), C(cipher_mode), C(hash_alg),
        C(iter_time)) makes a new image LUKS-encrypted; the passphrase comes from C(passphrase_file) on the
        managed host (relative to O(dir)), read when an action needs it. A passphrase written in the data is
        refused (and masked in the results). See C(docs/security.md).
      - C(source) is a local image, or an C(http://) or C(https://) URL that the managed host downloads
        when the image is made, verified against C(source_checksum) (V(sha256:HEX) or V(sha512:HEX),
        required with a URL) before anything is converted. Planning (check mode included) never downloads.
      - Required unless O(src) is given; mutually exclusive with it.
    type: list
    elements: dict
  defaults:
    description:
      - Fields merged under every image, as a manifest's C(defaults); C(options) merge key by key.
    type: dict
    default: {}
  dir:
    description:
      - Directory that relative paths in O(images) are relative to, as a manifest's own directory.
      - Images, sources and backing files must be inside it or inside O(allowed_paths).
      - Required with O(images).
    type: path
  allowed_paths:
    description:
      - Directories outside O(dir) (or the directory of O(src)) where images, sources and backing files may
        be, as C(vdisk apply --allow-path).
  src:
    description:
      - Path of a manifest file on the managed host, used instead of O(images) and O(defaults).
      - Relative paths in it are relative to its directory.
    type: path
  cache:
    description:
      - Download cache directory on the managed host for URL sources, as C(vdisk apply --cache); made when
        missing. Files are kept by checksum (C(sha256-HEX)), re-verified each time they are used, and
        downloaded only when missing or corrupted.
      - Check mode predicts the size of an image made from a URL source from the cache; without the file
        in the cache that size is unknown (V(null)) until it is downloaded.
      - Without it, each download goes to a hidden temporary file beside the image, removed once converted.
    type: path
extends_documentation_fragment:
  - vdisk.images.allowed_paths
  - vdisk.images.attributes
attributes:
  check_mode:
    support: full
    details: Plans every image, predicting the images the run makes before it; nothing is written.
  diff_mode:
    support: full
    details: Shows each changed image's properties (format, virtual size, options, backing file, snapshots) before and after.
seealso:
  - module: vdisk.images.image
  - module: vdisk.images.image_snapshot
  - module: vdisk.images.image_convert
"""

EXAMPLES = r"""
- name: A golden image, an overlay on it and a converted appliance, in one task
  vdisk.images.manifest:
    dir: /srv/images
    defaults:
      format: qcow2
      options: {lazy_refcounts: true}
    images:
      - path: vms/web.qcow2
        backing_file: ../golden/base.qcow2      # as stored in the image: relative to its directory
        backing_format: qcow2
        snapshots: [pristine]
      - path: golden/base.qcow2
        size: 8G
        mode: "0640"
      - path: appliance.qcow2
        source: downloads/appliance.vmdk
        source_format: vmdk
        compress: true

- name: An image made from a cloud image downloaded over https, kept in a download cache
  vdisk.images.manifest:
    dir: /srv/images
    cache: /var/cache/vdisk
    images:
      - path: golden/debian-12.qcow2
        source: https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-generic-amd64.qcow2
        source_checksum: "sha512:{{ debian_image_sha512 }}"
        size: 20G

- name: Apply a manifest file kept on the managed host
  vdisk.images.manifest:
    src: /srv/images/manifest.yml
    allowed_paths:
      - /var/lib/libvirt/images
"""

RETURN = r"""
actions:
  description:
    - The changes made (in check mode, the changes that would be made), in the order they run; empty when
      nothing changed.
  returned: always
  type: list
  elements: dict
  contains:
    image:
      description: The image's path as written in O(images) (or the manifest).
      type: str
    path:
      description: The image's resolved path.
      type: str
    kind:
      description:
        - V(create), V(convert), V(replace), V(delete), V(grow), V(shrink), V(amend), V(snapshot_create),
          V(snapshot_delete), V(attributes).
      type: str
    description:
      description: What the action does, in words.
      type: str
  sample:
    - image: golden/base.qcow2
      path: /srv/images/golden/base.qcow2
      kind: create
      description: create /srv/images/golden/base.qcow2 (qcow2, 8 GiB)
images:
  description: Every image, in the order they are planned (dependencies first).
  returned: always
  type: list
  elements: dict
  contains:
    image:
      description: The image's path as written.
      type: str
    path:
      description: The image's resolved path.
      type: str
    changed:
      description: Whether the image has actions.
      type: bool
    before:
      description: The image's properties before the changes.
      type: dict
    after:
      description: The image's properties after the changes (predicted).
      type: dict
problems:
  description: When validation fails, every problem as C(vdisk validate) prints it (also joined in C(msg)).
  returned: failure
  type: list
  elements: str
report:
  description:
    - When applying fails, what was done, the action that failed (with its error) and what was not done,
      as C(vdisk apply --output=json) reports it.
  returned: failure
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.errors import ImageError
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.interrupt import Terminated, signals_raise
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.load import load_data, load_manifests
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.render import report_dict
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.batch import apply_all, plan_all
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.download import DownloadSettings
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.image import widen


def _action(entry, action):
    return {"image": entry.name, "path": action.path, "kind": action.kind, "description": action.description}


def _masked(module):
    """A passphrase written in the images' data by mistake (a manifest takes passphrase_file only, so it is
    refused) is still kept out of the module's results (invocation): Ansible masks no_log values."""
    params = module.params
    for fields in list(params["images"] or []) + [params["defaults"] or {}]:
        encryption = fields.get("encryption") if isinstance(fields, dict) else None
        if isinstance(encryption, dict) and isinstance(encryption.get("passphrase"), str):
            module.no_log_values.add(encryption["passphrase"])


def main():
    module = AnsibleModule(
        argument_spec=dict(
            images=dict(type="list", elements="dict"),
            defaults=dict(type="dict", default={}),
            dir=dict(type="path"),
            allowed_paths=dict(type="list", elements="path", default=[]),
            src=dict(type="path"),
            cache=dict(type="path"),
        ),
        required_one_of=[("images", "src")],
        mutually_exclusive=[("images", "src"), ("dir", "src")],
        required_by={"images": "dir"},
        supports_check_mode=True,
    )
    params = module.params
    _masked(module)
    if params["src"]:
        if params["defaults"]:
            module.fail_json(msg="defaults are given in the manifest file, not with src")
        loaded = load_manifests([params["src"]], params["allowed_paths"])
    else:
        loaded = load_data(params["images"], params["defaults"], params["dir"], params["allowed_paths"])
    if not loaded.valid:
        problems = [str(p) for p in loaded.problems]
        module.fail_json(msg="\n".join(problems), problems=problems)

    policy = widen(None, loaded.allowed_dirs)
    downloads = DownloadSettings(cache_dir=params["cache"])
    try:
        with signals_raise():      # killed (SIGTERM, SIGHUP): a new image's (or download's) temporary file is removed
            plans = plan_all(loaded.entries, policy, downloads)
            errors = ["%s: %s" % (p.entry.label, p.error) for p in plans if p.error]
            if errors:
                module.fail_json(msg="\n".join(errors), problems=errors)
            report = None if module.check_mode else apply_all(loaded.entries, policy, plans, downloads)
    except Terminated as exc:
        module.fail_json(msg="interrupted: %s" % exc)
    except (ImageError, OSError) as exc:
        module.fail_json(msg=str(exc))

    if report is None:
        actions = [_action(p.entry, a) for p in plans for a in p.actions]
    else:       # what ran: an image made from a URL source is planned again, with its size, once downloaded
        actions = [_action(e, a) for e, a in report.done]
    images = [{"image": p.entry.name, "path": p.entry.spec.path, "changed": p.changed, "before": p.before,
               "after": p.after} for p in plans]
    out = dict(changed=bool(actions), actions=actions, images=images)
    if module._diff:
        out["diff"] = [{"before_header": p.entry.spec.path, "after_header": p.entry.spec.path,
                        "before": p.before, "after": p.after} for p in plans if p.changed]
    if report is not None and report.failed is not None:
        entry, _action_failed, message = report.failed
        out.update(changed=bool(report.done), actions=[_action(e, a) for e, a in report.done],
                   report=report_dict(report))
        module.fail_json(msg="%s: %s" % (entry.label, message), **out)
    module.exit_json(**out)


if __name__ == "__main__":
    main()
