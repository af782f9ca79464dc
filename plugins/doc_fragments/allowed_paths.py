# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function
__metaclass__ = type


class ModuleDocFragment(object):
    """The O(allowed_paths) option of the modules that open images (image, image_info, image_snapshot,
    image_convert; manifest gives it its own description and takes its type from here)."""

    DOCUMENTATION = r'''
options:
  allowed_paths:
    description:
      - Directories outside an image's own directory tree from which the files the image names (its backing
        files) may be opened, as the command line's C(--allow-path).
      - By default only the image's own directory tree is allowed. A name with a protocol prefix or a
        C(json:) specification, and a file that is not a regular file, are refused whatever this says.
        See C(docs/security.md).
    type: list
    elements: path
    default: []
'''
