import gc

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from instaboost.engine.checkpoint import CheckpointManager, load_checkpoint
from instaboost.engine.finite import kernel_all_finite
from instaboost.engine.train_step import UnitLossScaler, build_loss_scaler, make_train_step

FINITE_CHECKS = [pytest.param(ms.amp.all_finite, id="mindspore-check"),
                 pytest.param(kernel_all_finite, id="kernel-check")]


def _regression_problem(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(16, 3)).astype(np.float32)
    y = (x @ np.array([[1.0, -2.0], [0.5, 0.0], [0.0, 3.0]], np.float32)).astype(np.float32)
    return ms.Tensor(x), ms.Tensor(y)


@pytest.mark.parametrize("clip_norm", [None, 10.0])  # clipping alone would hide unscaled grads
@pytest.mark.parametrize("finite_check", FINITE_CHECKS)
@pytest.mark.parametrize("scaler_kind,scale", [("none", 1.0), ("static", 128.0), ("dynamic", 1024.0)])
def test_loss_drops_with_every_scaler(scaler_kind, scale, finite_check, clip_norm):
    ms.set_seed(0)
    net = nn.Dense(3, 2)
    lrs = ms.Tensor(np.full(20, 0.1, np.float32))
    opt = nn.Momentum(net.trainable_params(), learning_rate=lrs, momentum=0.9)

    def forward(x, y):
        err = net(x) - y
        return {"l2": (err ** 2).mean(), "l1": ms.ops.abs(err).mean()}

    step = make_train_step(forward, opt, loss_names=["l2", "l1"], scaler=build_loss_scaler(scaler_kind, scale),
                           clip_norm=clip_norm, finite_check=finite_check)
    x, y = _regression_problem()
    losses = []
    for _ in range(10):
        loss, terms, finite = step(x, y)
        assert bool(finite)
        assert float(loss) == pytest.approx(float(terms[0]) + float(terms[1]), rel=1e-5)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("finite_check", FINITE_CHECKS)
def test_non_finite_gradients_skip_the_update(finite_check):
    net = nn.Dense(3, 2)
    opt = nn.Momentum(net.trainable_params(), learning_rate=0.1, momentum=0.9)
    before = net.weight.asnumpy().copy()

    def forward(x, y):
        return {"bad": (net(x) * ms.Tensor(np.inf, ms.float32)).mean()}

    step = make_train_step(forward, opt, loss_names=["bad"], scaler=build_loss_scaler("none", 1.0),
                           finite_check=finite_check)
    _, _, finite = step(*_regression_problem())
    assert not bool(finite)
    np.testing.assert_array_equal(net.weight.asnumpy(), before)


def test_a_skipped_step_still_advances_the_learning_rate_schedule():
    # Rates 0.1, 0.2, 0.3 by step: step 1 is skipped (non-finite), so step 2 must update with 0.2.
    net = nn.Dense(3, 2)
    opt = nn.SGD(net.trainable_params(), learning_rate=ms.Tensor(np.array([0.1, 0.2, 0.3], np.float32)))
    poison = ms.Parameter(ms.Tensor(np.inf, ms.float32), requires_grad=False)

    def forward(x, y):
        return {"l2": ((net(x) - y) ** 2).mean() * poison}

    step = make_train_step(forward, opt, loss_names=["l2"], scaler=build_loss_scaler("none", 1.0))
    x, y = _regression_problem()
    assert not bool(step(x, y)[2])
    assert int(opt.global_step.asnumpy()[0]) == 1
    poison.set_data(ms.Tensor(1.0, ms.float32))
    grad = ms.grad(lambda: ((net(x) - y) ** 2).mean(), None, net.trainable_params())()
    before = net.weight.asnumpy().copy()
    assert bool(step(x, y)[2])
    np.testing.assert_allclose(before - net.weight.asnumpy(), 0.2 * grad[0].asnumpy(), rtol=1e-5, atol=1e-7)
    assert int(opt.global_step.asnumpy()[0]) == 2


def test_unit_scale_skips_unscaling_without_changing_the_update():
    """A static scale of 1 (the default) is applied as no scaling at all; a power-of-two scale
    is exact in float32, so both must give the same weights (to 1e-6: MindSpore's threaded CPU
    kernels do not always sum in the same order, which once made them differ in the last bit)."""
    assert isinstance(build_loss_scaler("none", 1.0), UnitLossScaler)
    assert isinstance(build_loss_scaler("static", 1.0), UnitLossScaler)
    assert not isinstance(build_loss_scaler("static", 2.0), UnitLossScaler)
    assert not isinstance(build_loss_scaler("dynamic", 1.0), UnitLossScaler), "a dynamic scale can grow"

    def trained_weight(scaler):
        ms.set_seed(0)
        net = nn.Dense(3, 2)
        opt = nn.Momentum(net.trainable_params(), learning_rate=0.1, momentum=0.9)

        def forward(x, y):
            return {"l2": ((net(x) - y) ** 2).mean()}

        step = make_train_step(forward, opt, loss_names=["l2"], scaler=scaler)
        for _ in range(3):
            step(*_regression_problem())
        return net.weight.asnumpy()

    np.testing.assert_allclose(trained_weight(build_loss_scaler("static", 1.0)),
                               trained_weight(build_loss_scaler("static", 2.0)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_a_new_scaler_never_uses_an_earlier_scalers_value(kind):
    """MindSpore 2.10's own scalers, made one after another, could unscale by the value of an
    earlier, garbage-collected one (a sweep's jobs run in one process, a scaler each)."""
    grads = (ms.Tensor(np.ones((2, 3), np.float32)), ms.Tensor(np.ones(2, np.float16)))
    for i in range(40):
        value = float(2 ** (1 + i % 5))
        scaler = build_loss_scaler(kind, value)
        unscaled = scaler.unscale(grads)
        assert [u.dtype for u in unscaled] == [ms.float32, ms.float16]
        assert [float(u.asnumpy().flat[0]) for u in unscaled] == [1 / value] * 2, f"scaler {i}"
        assert float(scaler.scale(ms.Tensor(3.0, ms.float32))) == 3 * value
        del scaler, unscaled
        gc.collect()


def test_unknown_scaler_names_the_key():
    with pytest.raises(ValueError, match="schedule.loss_scale_type"):
        build_loss_scaler("bogus", 1.0)


def test_checkpoint_manager_keeps_latest_and_best_and_restores_optimizer(tmp_path):
    net = nn.Dense(3, 2)
    opt = nn.Momentum(net.trainable_params(), learning_rate=0.1, momentum=0.9)
    manager = CheckpointManager(tmp_path, keep_latest=2, keep_best=2)
    assert manager.save_best(net, opt, 0, -1.0) is None, "COCOeval's -1 ranks nothing, even first"
    for step in range(4):
        manager.save_latest(net, opt, step)
    assert [p.name for p in manager.latest] == ["step_00000002.ckpt", "step_00000003.ckpt"]
    assert manager.save_best(net, opt, 4, 0.3) is not None
    assert manager.save_best(net, opt, 5, 0.5) is not None
    assert manager.save_best(net, opt, 6, 0.1) is None, "worse than the best two: not kept"
    assert manager.save_best(net, opt, 7, 0.4) is not None
    assert manager.save_best(net, opt, 8, -1.0) is None, "COCOeval's -1: no ground truth"
    assert sorted(v for v, _ in manager.best) == [0.4, 0.5]
    assert len(list(tmp_path.glob("*.ckpt"))) == 4

    opt.moments[0].set_data(ms.Tensor(np.full((2, 3), 7.0, np.float32)))
    path = manager.save_latest(net, opt, 8)
    fresh_net = nn.Dense(3, 2)
    fresh_opt = nn.Momentum(fresh_net.trainable_params(), learning_rate=0.1, momentum=0.9)
    names = load_checkpoint(path, fresh_net, fresh_opt)
    assert "moments.weight" in names and "global_step" in names
    np.testing.assert_array_equal(fresh_net.weight.asnumpy(), net.weight.asnumpy())
    np.testing.assert_array_equal(fresh_opt.moments[0].asnumpy(), np.full((2, 3), 7.0, np.float32))


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_checkpoint(tmp_path / "nope.ckpt", nn.Dense(3, 2))


def test_best_checkpoint_of_the_last_step_links_instead_of_rewriting(tmp_path):
    net = nn.Dense(3, 2)
    opt = nn.Momentum(net.trainable_params(), learning_rate=0.1, momentum=0.9)
    manager = CheckpointManager(tmp_path, keep_latest=1, keep_best=1)
    latest = manager.save_latest(net, opt, 96)
    best = manager.save_best(net, opt, 96, 0.17)
    assert best.stat().st_ino == latest.stat().st_ino
    assert manager.kept() == [best], "the same step is logged once"


def test_gradient_clipping_bounds_the_update():
    """schedule.grad_clip: the global gradient norm is scaled down to clip_norm before SGD."""
    lr, clip_norm = 0.5, 0.01
    ms.set_seed(0)
    net = nn.Dense(3, 2)
    opt = nn.SGD(net.trainable_params(), learning_rate=lr)
    before = [p.asnumpy().copy() for p in net.trainable_params()]

    def forward(x, y):
        return {"l2": ((net(x) - y) ** 2).mean()}

    step = make_train_step(forward, opt, loss_names=["l2"], scaler=build_loss_scaler("none", 1.0),
                           clip_norm=clip_norm)
    assert bool(step(*_regression_problem())[2])
    change = np.sqrt(sum(((p.asnumpy() - b) ** 2).sum()
                         for p, b in zip(net.trainable_params(), before)))
    np.testing.assert_allclose(change, lr * clip_norm, rtol=1e-4)   # the raw gradient is larger


def test_dynamic_scale_shrinks_after_an_overflow():
    net = nn.Dense(3, 2)
    opt = nn.Momentum(net.trainable_params(), learning_rate=0.1, momentum=0.9)
    poison = ms.Parameter(ms.Tensor(np.inf, ms.float32), requires_grad=False)

    def forward(x, y):
        return {"l2": ((net(x) - y) ** 2).mean() * poison}

    scaler = build_loss_scaler("dynamic", 1024.0)
    step = make_train_step(forward, opt, loss_names=["l2"], scaler=scaler)
    assert not bool(step(*_regression_problem())[2])
    assert float(scaler.scale_value.asnumpy()) < 1024.0
