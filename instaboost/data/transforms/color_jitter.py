"""InstaBoost colour jitter, in the image's real channel order.

The reference (instaboostfast ``randomColor``) converts its BGR image to RGB and applies four
PIL ``ImageEnhance`` steps in order: Color (saturation), Brightness, Contrast, Sharpness.  Each
step blends the image with a "degenerate" image: ``out = degenerate + f * (image - degenerate)``

- Color:      degenerate = luma ``L = 0.299 R + 0.587 G + 0.114 B`` replicated on 3 channels,
              ``f`` uniform on {0.0, 0.1, ..., 3.0};
- Brightness: degenerate = black, ``f`` on {1.0, 1.1, ..., 2.0};
- Contrast:   degenerate = a flat image at the rounded mean luma, ``f`` on {1.0, ..., 2.0};
- Sharpness:  degenerate = the 3x3 SMOOTH filter (weights 1 1 1 / 1 5 1 / 1 1 1, sum 13) with
              the one-pixel border kept, ``f`` on {0.0, ..., 3.0}.

Here the same steps run with OpenCV directly on the BGR image (luma weights taken in B, G, R
order), so no channel swap is needed.  OpenCV rounds where PIL truncates, by at most one grey
level per step, and the later steps amplify it by their factor: measured against PIL on a real
image, up to 2 levels for saturation 3 alone and up to 18 at isolated pixels with all four steps
at their extremes (3, 2, 2, 3), the means within 0.8 level.  For 1-channel images only
Brightness applies (saturation of a grey image is meaningless); for 4-channel BGRA images the
alpha channel is left untouched.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# Factor grids of the reference: integer draws divided by FACTOR_DIVISOR.
FACTOR_DIVISOR = 10.0
SATURATION_RANGE = (0, 30)   # inclusive integer range -> factor 0.0 .. 3.0
BRIGHTNESS_RANGE = (10, 20)  # -> 1.0 .. 2.0
CONTRAST_RANGE = (10, 20)    # -> 1.0 .. 2.0
SHARPNESS_RANGE = (0, 30)    # -> 0.0 .. 3.0
# PIL ImageFilter.SMOOTH kernel.
SMOOTH_KERNEL = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13.0
COLOR_CHANNELS = 3


@dataclass(frozen=True)
class ColorFactors:
    """The four enhancement factors of one colour-jitter draw (1.0 = unchanged)."""

    saturation: float
    brightness: float
    contrast: float
    sharpness: float


def _draw(rng: np.random.Generator, bounds: tuple[int, int]) -> float:
    return float(rng.integers(bounds[0], bounds[1] + 1)) / FACTOR_DIVISOR


def sample_color_factors(rng: np.random.Generator) -> ColorFactors:
    """Draw the four factors on the reference's grids (saturation, brightness, contrast, sharpness)."""
    return ColorFactors(
        saturation=_draw(rng, SATURATION_RANGE),
        brightness=_draw(rng, BRIGHTNESS_RANGE),
        contrast=_draw(rng, CONTRAST_RANGE),
        sharpness=_draw(rng, SHARPNESS_RANGE),
    )


def _blend(image: np.ndarray, degenerate: np.ndarray, factor: float) -> np.ndarray:
    """``degenerate + factor * (image - degenerate)`` saturated to uint8."""
    return cv2.addWeighted(image, factor, degenerate, 1.0 - factor, 0.0)


def _jitter_bgr(bgr: np.ndarray, factors: ColorFactors) -> np.ndarray:
    """Apply the four steps to a contiguous uint8 (H, W, 3) BGR image."""
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    out = _blend(bgr, cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), factors.saturation)
    out = cv2.convertScaleAbs(out, alpha=factors.brightness)
    mean_luma = int(cv2.mean(cv2.cvtColor(out, cv2.COLOR_BGR2GRAY))[0] + 0.5)
    out = cv2.addWeighted(out, factors.contrast, out, 0.0, (1.0 - factors.contrast) * mean_luma)
    smooth = cv2.filter2D(out, -1, SMOOTH_KERNEL, borderType=cv2.BORDER_REPLICATE)
    smooth[0, :] = out[0, :]
    smooth[-1, :] = out[-1, :]
    smooth[:, 0] = out[:, 0]
    smooth[:, -1] = out[:, -1]
    return _blend(out, smooth, factors.sharpness)


def apply_color_jitter(image: np.ndarray, factors: ColorFactors) -> np.ndarray:
    """Colour-jitter a uint8 (H, W, C) image whose first three channels are B, G, R.

    C == 1 or 2: brightness of channel 0 only.  C >= 3: the reference's four steps on channels
    0..2 (BGR); further channels (alpha) are copied unchanged.  Returns a new uint8 (H, W, C).
    """
    channels = image.shape[2]
    out = image.copy()
    if channels >= COLOR_CHANNELS:
        bgr = np.ascontiguousarray(image[:, :, :COLOR_CHANNELS])
        out[:, :, :COLOR_CHANNELS] = _jitter_bgr(bgr, factors)
    else:
        grey = np.ascontiguousarray(image[:, :, 0])
        out[:, :, 0] = cv2.convertScaleAbs(grey, alpha=factors.brightness)
    return out
