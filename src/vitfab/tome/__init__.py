"""The token axis: Token Merging (ToMe, Bolya et al., ICLR 2023) for timm ViTs.

``merge.py`` is the algorithm (bipartite soft matching, size-weighted merge, source tracing) and
knows nothing of timm; ``schedule.py`` turns r specs into per-layer r; ``patch.py`` is the timm
glue (``apply`` / ``set_schedule`` / ``remove``); ``supernet.py`` the same merge inside AutoFormer's
supernet (``apply_supernet``); ``visualize.py`` draws the merged groups.
"""

from .merge import DEFAULT_PARTITION, PARTITIONS, Matching, bipartite_soft_matching, clip_r, merge_source, merge_wavg
from .patch import (
    ToMeError,
    apply,
    apply_recorded,
    apply_spec,
    block_macs,
    is_patched,
    remove,
    resolve_schedule,
    set_schedule,
    tome_info,
)
from .schedule import RECORDED, Schedule, ScheduleError, parse_tome_spec, token_counts
from .supernet import apply_supernet, is_supernet_patched, remove_supernet

__all__ = [
    "DEFAULT_PARTITION", "Matching", "PARTITIONS", "RECORDED", "Schedule", "ScheduleError", "ToMeError", "apply",
    "apply_recorded", "apply_spec", "apply_supernet", "is_supernet_patched", "remove_supernet",
    "bipartite_soft_matching", "block_macs", "clip_r", "is_patched", "merge_source", "merge_wavg",
    "parse_tome_spec", "remove", "resolve_schedule", "set_schedule", "token_counts", "tome_info",
]
