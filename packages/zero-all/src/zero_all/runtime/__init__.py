"""``deepspeed.runtime``'s names that scripts import: ``lr_schedules``."""

from . import lr_schedules

__all__ = ["lr_schedules"]
