"""The one training loop: it learns, its data order is a function of the seed and the step, and a
run interrupted at any point (an exception, kill -9, a corrupt checkpoint) and rerun gives the same
bits as one never interrupted."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jinterp.runs import Run
from jinterp.train import shuffled_batches, train

N, D, BATCH = 256, 6, 32
PLANTED = np.linspace(-2.0, 3.0, D).astype(np.float32)


class Regression(eqx.Module):
    """Batches of a planted linear regression, held as fields so they are not compiled in."""

    x: jax.Array
    y: jax.Array

    def __call__(self, step):
        i = shuffled_batches(N, BATCH, seed=7)(step)
        return self.x[i], self.y[i]


def data() -> Regression:
    x = np.random.default_rng(0).normal(size=(N, D)).astype(np.float32)
    return Regression(jnp.asarray(x), jnp.asarray(x @ PLANTED + 0.5))


def squared_error(params, batch):
    x, y = batch
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def fit(run=None, steps=300, evaluate=None, **kwargs):
    params = {"w": jnp.zeros(D), "b": jnp.zeros(())}
    return train(params, squared_error, optax.adam(0.05), data(), steps=steps, eval_every=50, run=run,
                 evaluate=evaluate, progress=False, **kwargs)


def assert_same_bits(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_loss_decreases_and_the_planted_weights_are_recovered():
    trained = fit(steps=600, evaluate=lambda p: {"w": p["w"]})
    loss = trained.history["loss"]
    assert loss.shape == (600,) and loss[-1] < 1e-6 < loss[0]  # measured 5.9e-13 and 17
    np.testing.assert_allclose(trained.params["w"], PLANTED, atol=1e-5)  # converged: measured 7.2e-7
    np.testing.assert_allclose(trained.params["b"], 0.5, atol=1e-6)  # measured 6e-8
    assert trained.history["eval_step"].tolist() == list(range(0, 601, 50))
    np.testing.assert_array_equal(trained.history["w"][0], np.zeros(D))  # evaluated before the first step


def test_shuffled_batches_cover_each_epoch_once_and_depend_only_on_seed_and_step():
    batches = shuffled_batches(10, 3, seed=1)
    epoch = [np.asarray(batches(jnp.int32(s))) for s in range(3)]  # 3 batches per epoch, one index left out
    seen = np.concatenate(epoch)
    assert len(set(seen.tolist())) == 9 and seen.max() < 10
    np.testing.assert_array_equal(batches(jnp.int32(4)), shuffled_batches(10, 3, seed=1)(jnp.int32(4)))
    assert not np.array_equal(batches(jnp.int32(0)), batches(jnp.int32(3)))  # a new permutation per epoch
    assert not np.array_equal(batches(jnp.int32(0)), shuffled_batches(10, 3, seed=2)(jnp.int32(0)))
    with pytest.raises(ValueError, match="batch_size"):
        shuffled_batches(10, 11, seed=0)


def test_only_the_trainable_part_changes():
    params = {"w": jnp.zeros(D), "b": jnp.full((), 0.5), "count": jnp.arange(3)}
    trained = train(params, squared_error, optax.adam(0.05), data(), steps=100, eval_every=50, progress=False,
                    trainable={"w": True, "b": False, "count": False})
    assert float(trained.params["b"]) == 0.5 and trained.params["count"].tolist() == [0, 1, 2]
    assert np.abs(np.asarray(trained.params["w"])).sum() > 0
    with pytest.raises(ValueError, match="Nothing to train"):
        train(params, squared_error, optax.adam(0.05), data(), steps=10, trainable=lambda leaf: False)
    with pytest.raises(ValueError, match="multiple of eval_every"):
        fit(checkpoint_every=75)
    with pytest.raises(ValueError, match="steps"):
        fit(steps=0)


class Interrupted(RuntimeError):
    pass


def test_an_interrupted_run_resumes_to_the_same_bits(tmp_path):
    reference = fit(steps=300, evaluate=lambda p: {"b": p["b"]})

    def crash_after(step):
        calls = iter(range(10_000))

        def evaluate(params):
            if next(calls) * 50 == step:
                raise Interrupted
            return {"b": params["b"]}
        return evaluate

    run = Run(tmp_path, None, quiet=True)
    with pytest.raises(Interrupted):
        fit(run, evaluate=crash_after(200), checkpoint_every=100)  # the checkpoint at 100 survives
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "train").iterdir()) == ["000000100",
                                                                                       "000000100.json"]
    resumed = fit(Run(tmp_path, None, quiet=True), evaluate=lambda p: {"b": p["b"]}, checkpoint_every=100)
    assert_same_bits(resumed.params, reference.params)
    assert_same_bits(resumed.history, reference.history)
    again = fit(Run(tmp_path, None, quiet=True), evaluate=crash_after(-1), checkpoint_every=100)  # restored
    assert_same_bits(again.history, reference.history)


def test_a_corrupt_checkpoint_is_discarded_and_the_run_recomputed(tmp_path):
    reference = fit()
    fit(Run(tmp_path, None, quiet=True))
    [newest] = (tmp_path / "checkpoints" / "train").glob("*.json")
    array = max((p for p in newest.with_suffix("").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(array.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    array.write_bytes(bytes(raw))
    messages = []
    run = Run(tmp_path, None, quiet=True)
    run.store.log = messages.append
    assert_same_bits(fit(run).params, reference.params)
    assert any("corrupt or incomplete" in m for m in messages)


SCRIPT = """
import sys, time
import jax.numpy as jnp, optax
sys.path.insert(0, {tests!r})
from test_train import data, squared_error, D
from jinterp.runs import Run
from jinterp.train import train

def slow(params):
    time.sleep(0.05)
    return {{"b": params["b"]}}

params = {{"w": jnp.zeros(D), "b": jnp.zeros(())}}
train(params, squared_error, optax.adam(0.05), data(), steps=2000, eval_every=10, evaluate=slow,
      run=Run({directory!r}, None, quiet=True), progress=False)
"""


def test_kill_9_mid_training_then_rerun_is_bit_identical(tmp_path):
    script = textwrap.dedent(SCRIPT.format(tests=os.path.dirname(__file__), directory=str(tmp_path)))
    child = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    folder = tmp_path / "checkpoints" / "train"
    deadline = time.monotonic() + 120
    while not any(folder.glob("*.json")) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere in the middle of the next blocks and checkpoint writes
    assert child.poll() is None, child.stderr.read().decode()[-2000:]
    child.send_signal(signal.SIGKILL)
    child.wait()
    steps_done = max(int(p.stem) for p in folder.glob("*.json"))
    assert 0 < steps_done < 2000

    def evaluate(params):
        return {"b": params["b"]}

    params = {"w": jnp.zeros(D), "b": jnp.zeros(())}
    run = lambda r: train(params, squared_error, optax.adam(0.05), data(), steps=2000, eval_every=10,  # noqa: E731
                          evaluate=evaluate, run=r, progress=False)
    resumed = run(Run(tmp_path, None, quiet=True))
    uninterrupted = run(None)
    assert_same_bits(resumed.params, uninterrupted.params)
    assert_same_bits(resumed.history, uninterrupted.history)


def test_snapshots_are_the_params_at_those_steps_and_survive_a_resume(tmp_path):
    reference = fit(steps=300, snapshot_every=100)
    assert sorted(reference.snapshots) == [0, 100, 200, 300]
    assert_same_bits(reference.snapshots[100], fit(steps=100).params)
    assert_same_bits(reference.snapshots[300], reference.params)
    assert_same_bits(reference.snapshots[0], {"w": jnp.zeros(D), "b": jnp.zeros(())})

    def crash_at_250(params):
        if float(params["b"]) == float(reference.history["b"][5]):
            raise Interrupted
        return {"b": params["b"]}

    reference = fit(steps=300, snapshot_every=100, evaluate=lambda p: {"b": p["b"]})
    with pytest.raises(Interrupted):
        fit(Run(tmp_path, None, quiet=True), evaluate=crash_at_250, checkpoint_every=100, snapshot_every=100)
    resumed = fit(Run(tmp_path, None, quiet=True), evaluate=lambda p: {"b": p["b"]}, checkpoint_every=100,
                  snapshot_every=100)
    assert sorted(resumed.snapshots) == [0, 100, 200, 300]
    for step in resumed.snapshots:
        assert_same_bits(resumed.snapshots[step], reference.snapshots[step])
    with pytest.raises(ValueError, match="snapshot_every=75 must be a positive multiple of eval_every=50"):
        fit(steps=100, snapshot_every=75)
