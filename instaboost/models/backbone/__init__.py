"""Backbones."""
from instaboost.models.backbone.resnet import ResNet, load_pretrained

__all__ = ["ResNet", "load_pretrained"]
