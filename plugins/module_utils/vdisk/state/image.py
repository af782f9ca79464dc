"""One image, end to end: observe what the spec needs, plan, and (unless checking) apply.

The entry points the ``image`` module and the manifest applier call; everything they decide
comes from :mod:`.plan`.
"""
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..driver import Policy
from .apply import apply
from .download import observe_download
from .encryption import check_passphrase, mismatch
from .observe import ObservedImage, observe
from .plan import Action, plan, predict, properties
from .spec import ImageSpec


@dataclass
class Result:
    """What planning (and applying) one image gave: the actions, the diff, the image afterwards."""
    actions: List[Action]
    before: Dict[str, Any]
    after: Dict[str, Any]
    observed: ObservedImage                      # before any action
    final: Optional[ObservedImage] = None        # re-read after applying (None in check mode)
    applied: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.actions)


def backing_path(spec: ImageSpec) -> Optional[str]:
    """The host path of the spec's backing file (stored relative to the image's directory)."""
    if not spec.backing_file:
        return None
    if os.path.isabs(spec.backing_file):
        return spec.backing_file
    return os.path.join(os.path.dirname(os.path.abspath(spec.path)), spec.backing_file)


def policy_for(spec: ImageSpec, policy: Optional[Policy] = None) -> Policy:
    """*policy* widened to the directory of the backing file the spec names: the user named it."""
    base = backing_path(spec)
    return widen(policy, (os.path.dirname(os.path.realpath(base)),)) if base else (policy or Policy())


def widen(policy: Optional[Policy], allowed_dirs: Sequence[str] = ()) -> Policy:
    """*policy* (default: the engine's) with *allowed_dirs* (real paths) allowed as well; every other
    setting is kept, but not the file an open was in the middle of (``opening``)."""
    policy = policy or Policy()
    return policy.replace(allowed_dirs=tuple(policy.allowed_dirs) + tuple(allowed_dirs), opening=None)


# how a planner observes the source or backing file of an image it must make: (path, format, policy)
Dependency = Callable[[str, Optional[str], Policy], ObservedImage]
# where the verified local copy of a URL source is, when there is one: (url, checksum) -> path or None
LocalCopy = Callable[[str, str], Optional[str]]


def plan_one(spec: ImageSpec, policy: Policy, dependency: Optional[Dependency] = None,
             local_copy: Optional[LocalCopy] = None) -> Tuple[ObservedImage, List[Action]]:
    """The one "observe, then plan one image": observe the image and what its plan depends on, and plan.

    When the image must be made: its source (a URL source through *local_copy*: the download cache
    when planning, the fetched file when applying; none, and its size is not known yet) or its
    backing file.  When it exists with a backing file and no ``size``: the backing file, whose size
    it keeps.  Dependencies are observed through *dependency* (the batch planner predicts images
    made earlier in its run; default: observe the file).  *policy* is already :func:`policy_for` the spec."""
    dependency = dependency or observe
    observed = observe(spec.path, None, policy)
    if spec.state == "present" and spec.encryption is not None and observed.encryption is not None \
            and observed.format == spec.format and mismatch(spec.encryption, observed.encryption) is None:
        check_passphrase(spec.path, observed.format, spec.encryption, policy)    # a wrong one: an error now
    source = backing = None
    made = spec.state == "present" and (not observed.exists or spec.recreate)
    if made and spec.source:
        source = dependency(spec.source, spec.source_format, policy)
    if made and spec.source_url:
        copy = local_copy(spec.source_url, spec.source_checksum or "") if local_copy is not None else None
        if copy is not None:
            source = observe_download(copy, spec.source_url, spec.source_format, policy)
    from_source = spec.source or spec.source_url
    if spec.state == "present" and spec.backing_file and not from_source and (made or spec.size is None):
        # its size, and that it exists; read without image locks, as qemu-img create opens it
        backing = dependency(backing_path(spec) or "", spec.backing_format, policy.replace(force_share=True))
    return observed, plan(spec, observed, source, backing)


def plan_image(spec: ImageSpec, policy: Optional[Policy] = None) -> Result:
    """Plan one image (the ``image`` module): :func:`plan_one` on its own, errors raised."""
    observed, actions = plan_one(spec, policy_for(spec, policy))
    before = properties(observed)
    return Result(actions, before, predict(before, actions), observed)


def apply_image(spec: ImageSpec, policy: Optional[Policy] = None, check_mode: bool = False) -> Result:
    """Plan one image and, unless *check_mode*, apply the plan and read the image again."""
    result = plan_image(spec, policy)
    if check_mode or not result.actions:
        result.final = result.observed
        return result
    policy = policy_for(spec, policy)
    apply(result.actions, policy)
    result.applied = True
    result.final = observe(spec.path, None, policy)
    if result.final.exists:
        result.after = properties(result.final)
    return result
