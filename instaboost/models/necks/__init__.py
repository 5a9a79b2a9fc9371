"""Necks."""
from instaboost.models.necks.fpn import FPN

__all__ = ["FPN"]
