import numpy as np
import pytest

from instaboost.engine.lr_schedule import multistep_with_warmup, scaled_learning_rate


def test_linear_scaling_rule():
    assert scaled_learning_rate(0.02, 16, 2) == pytest.approx(0.0025)
    assert scaled_learning_rate(0.02, 16, 4, device_num=4) == pytest.approx(0.02)


def test_warmup_then_steps_at_epoch_boundaries():
    rates = multistep_with_warmup(lr=0.02, total_steps=120, steps_per_epoch=10, lr_steps=[8, 11],
                                  warmup_steps=5, warmup_ratio=0.001)
    assert rates[0] == pytest.approx(0.02 * 0.001)
    # mmdetection's linear warm-up: from lr * warmup_ratio to lr in equal increments
    np.testing.assert_allclose(rates[:6], np.linspace(0.02 * 0.001, 0.02, 6), rtol=1e-6)
    assert rates[5] == pytest.approx(0.02)
    assert rates[79] == pytest.approx(0.02) and rates[80] == pytest.approx(0.002)
    assert rates[109] == pytest.approx(0.002) and rates[110] == pytest.approx(0.0002)


def test_rejects_empty_schedule():
    with pytest.raises(ValueError, match="total_steps"):
        multistep_with_warmup(lr=0.1, total_steps=0, steps_per_epoch=1, lr_steps=[], warmup_steps=0,
                              warmup_ratio=1.0)
