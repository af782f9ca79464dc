"""Plan and apply loaded manifests: the state layer's batch planner (``state.batch``) over a
:class:`Loaded`'s entries, with the manifests' directories and allowed paths as the open policy."""
from typing import List, Optional

from ..driver import Policy
from ..state import batch
from ..state.batch import ImagePlan, Report
from ..state.download import DownloadSettings
from ..state.image import widen
from .load import Loaded


def base_policy(loaded: Loaded, policy: Optional[Policy] = None) -> Policy:
    """The open policy of a run: the manifests' directories and the allowed paths."""
    return widen(policy, loaded.allowed_dirs)


def plan_all(loaded: Loaded, policy: Optional[Policy] = None,
             downloads: Optional[DownloadSettings] = None) -> List[ImagePlan]:
    """The plan of every image, in dependency order; an image that cannot be planned carries ``error``.
    *downloads*: the download cache that URL sources are looked up in (planning never downloads)."""
    return batch.plan_all(loaded.entries, base_policy(loaded, policy), downloads)


def apply_all(loaded: Loaded, policy: Optional[Policy] = None, plans: Optional[List[ImagePlan]] = None,
              downloads: Optional[DownloadSettings] = None) -> Report:
    """Apply every image's plan in dependency order, stopping at the first failure (see ``state.batch``);
    *downloads*: how URL sources are fetched (cache directory, progress)."""
    return batch.apply_all(loaded.entries, base_policy(loaded, policy), plans, downloads)
