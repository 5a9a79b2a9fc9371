"""Inpainting the background under the instances (InstaBoost's first step)."""
import cv2
import numpy as np
import pytest

from instaboost.data.transforms.inpaint import inpaint_background

HEIGHT, WIDTH = 120, 160
OBJECT_COLOUR = (250, 0, 250)
# Mean absolute error against the hidden background on a smooth gradient (measured: 3.9; a
# black fill is 123 there).
MAX_MEAN_ERROR = 10.0


def smooth_background(channels: int) -> np.ndarray:
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    planes = [xx * 1.2 + 20, yy * 1.5 + 30, 200 - xx * 0.5 - yy * 0.3, 90 + xx * 0.3]
    noise = np.random.default_rng(0).normal(0, 3, (HEIGHT, WIDTH, channels))
    return np.clip(np.stack(planes[:channels], axis=2) + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_hole_is_filled_from_its_surroundings(channels):
    background = smooth_background(channels)
    hole = np.zeros((HEIGHT, WIDTH), np.uint8)
    cv2.ellipse(hole, (70, 60), (25, 15), 30, 0, 360, 1, -1)
    image = background.copy()
    image[hole > 0] = OBJECT_COLOUR[:channels] + (250,) * max(0, channels - 3)
    out = inpaint_background(image, hole)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[hole == 0], image[hole == 0])   # only the hole changes
    error = np.abs(out.astype(int) - background.astype(int))[hole > 0].mean()
    assert error < MAX_MEAN_ERROR


def test_no_hole_leaves_the_image_as_it_is():
    image = smooth_background(3)
    out = inpaint_background(image, np.zeros((HEIGHT, WIDTH), bool))
    np.testing.assert_array_equal(out, image)
    assert out is not image
