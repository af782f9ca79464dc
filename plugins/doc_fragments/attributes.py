# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function
__metaclass__ = type


class ModuleDocFragment(object):
    """The attributes every module of the collection has: what check mode, diff mode and platform mean,
    and the platform (POSIX hosts). Each module gives the support of check_mode and diff_mode and, in
    their C(details), what they do there."""

    DOCUMENTATION = r'''
attributes:
  check_mode:
    description: Can run in check mode and return a prediction of the changes without modifying the target.
  diff_mode:
    description: Returns details of what has changed (or would change in check mode) in diff mode.
  platform:
    description: Target OS/families that can be operated against.
    support: full
    platforms: posix
    details: Runs on POSIX hosts, with the engine bundled in the collection; qemu-img is not needed there.
'''
