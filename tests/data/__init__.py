"""Tests of instaboost.data (sources, demo data, transforms, InstaBoost engines, pipeline)."""
