"""Intervention recipes: every built-in intervention saved and loaded bit for bit; other models refused;
bad files named with their entry and mismatch; run, generate and the CLI take a recipe path."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import TOY, corrupted_pair

import jinterp
from jinterp import circuits, cli, recipes
from jinterp.sae import SAE, SAESplice

CLEAN, CORRUPT = corrupted_pair(3)
D, L, H, K = TOY.d_model, TOY.n_layers, TOY.n_heads, TOY.n_kv_heads


def _edits(model):
    """One of every built-in intervention, with the options that change their structure."""
    key = jax.random.split(jax.random.key(1), 8)
    _, cache = jinterp.run(model, CORRUPT, capture=["blocks.*.resid_pre", "blocks.1.resid_post", "blocks.*.attn.z"])
    sae = SAE.init(D, 20, "jumprelu", key=key[0], threshold=0.05, site="blocks.1.resid_post")
    transcoder = SAE.init(D, 16, "topk", k=4, key=key[1], site="blocks.2.ln2.normalized",
                          target_site="blocks.2.mlp_out")
    alignment = jinterp.das.Alignment.init(model, "blocks.1.resid_post", 3, [2, 4], key[2])
    circuit = np.random.default_rng(0).random(circuits.Graph.of(TOY).valid.shape) < 0.5
    _, edge_patch = circuits.edge_patch(model, circuit, CORRUPT)
    return [
        jinterp.Replace("resid_pre", cache.stack("resid_pre"), per_layer=True, layers=[0, 2], positions=[1, -1]),
        jinterp.Replace("blocks.0.attn.z", 0.0, heads=[1, 4]),  # a weakly typed scalar leaf
        jinterp.Add("blocks.1.resid_post", jax.random.normal(key[3], (D,)), scale=2.5, positions=[-1]),
        jinterp.Add("blocks.2.attn.v", jnp.ones(TOY.d_head, jnp.bfloat16), indices={"kv_head": [1]}),
        jinterp.Scale("blocks.*.mlp.post", 0.5),
        jinterp.Zero("attn.pattern", layers=[1], heads=[2], positions=[3]),
        jinterp.Project("blocks.0.resid_post", jax.random.normal(key[4], (D, 2)), keep=True),
        alignment.interchange(cache["blocks.1.resid_post"]),
        jinterp.Capture("blocks.1.attn.z"),
        SAESplice(sae=sae).clamp([3, 7], 2.0).steer([5], 1.5),
        SAESplice(sae=transcoder, keep_error=False),
        edge_patch,
    ]


def _assert_same_pytree(loaded, saved):
    assert jax.tree.structure(loaded) == jax.tree.structure(saved)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(saved), strict=True):
        assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
        assert getattr(a, "weak_type", None) == getattr(b, "weak_type", None)
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_every_builtin_intervention_round_trips_bit_for_bit(toy, tmp_path):
    edits = _edits(toy)
    assert {type(e).__name__ for e in edits} == set(recipes._types()) - {"SAE"}
    path = jinterp.save_edits(tmp_path / "all.json", edits, toy, note="one of each")
    assert (tmp_path / "all.safetensors").is_file()
    document = json.loads(path.read_text())
    assert document["format"] == recipes.FORMAT and document["note"] == "one of each"
    assert document["edits"][2]["describe"] == "Add at blocks.1.resid_post"
    loaded = jinterp.load_edits(path, toy)
    assert len(loaded) == len(edits)
    for one, other in zip(loaded, edits):
        _assert_same_pytree(one, other)
    assert loaded[1].value.weak_type and loaded[3].vector.dtype == ml_dtypes.bfloat16
    # Without a model, only the files are checked.
    _assert_same_pytree(jinterp.load_edits(path), tuple(edits))
    # Each edit reruns exactly (the edge patch and the transcoder replacing an MLP alone, as meant).
    for one, other in zip(loaded, edits):
        np.testing.assert_array_equal(jinterp.run(toy, CLEAN, edits=one)[0], jinterp.run(toy, CLEAN, edits=other)[0])


def test_run_and_generate_take_a_recipe_path(toy, tmp_path):
    steer = [jinterp.Add("blocks.1.resid_post", jnp.linspace(-1, 1, D), scale=3.0), jinterp.Zero("blocks.2.attn.z",
                                                                                                   heads=[0])]
    path = jinterp.save_edits(tmp_path / "steer.json", steer, toy)
    expected = jinterp.run(toy, CLEAN, edits=steer)[0]
    np.testing.assert_array_equal(jinterp.run(toy, CLEAN, edits=str(path))[0], expected)
    np.testing.assert_array_equal(jinterp.run(toy, CLEAN, edits=[path, jinterp.Scale("embed", 1.0)])[0], expected)
    out = jinterp.generate(toy, None, CLEAN[:2].tolist(), 3, edits=path, stop=())
    np.testing.assert_array_equal(out.tokens, jinterp.generate(toy, None, CLEAN[:2].tolist(), 3, edits=steer,
                                                               stop=()).tokens)


def test_a_recipe_for_other_weights_is_refused_unless_allowed(toy, tmp_path):
    path = jinterp.save_edits(tmp_path / "a.json", jinterp.Add("blocks.0.resid_pre", jnp.ones(D)), toy)
    other = jinterp.Transformer.init(TOY, jax.random.key(5), std=0.3)
    with pytest.raises(recipes.RecipeError, match=r"a\.json: made for a custom model with 3 layers.*"
                                                  r"allow_other_model=True"):
        jinterp.load_edits(path, other)
    with pytest.raises(recipes.RecipeError, match="made for"):
        jinterp.run(other, CLEAN, edits=path)
    (edit,) = jinterp.load_edits(path, other, allow_other_model=True)
    np.testing.assert_array_equal(edit.vector, np.ones(D, np.float32))
    # Same weights in another dtype: another fingerprint.
    with pytest.raises(recipes.RecipeError, match="made for"):
        jinterp.load_edits(path, toy.astype(jnp.bfloat16))


def test_shapes_that_do_not_fit_the_model_name_the_entry(toy, tmp_path):
    wide = TOY.replace(d_model=40, n_heads=4, n_kv_heads=2)
    other = jinterp.Transformer.init(wide, jax.random.key(0))
    path = jinterp.save_edits(tmp_path / "s.json", [jinterp.Zero("blocks.0.attn.z", heads=[5]),
                                                    jinterp.Add("blocks.1.resid_post", jnp.ones(D))], toy)
    with pytest.raises(recipes.RecipeError, match=r"s\.json: entry 0 \(Zero at blocks\.0\.attn\.z\): does not fit "
                                                  r"this model: .*head 5 is out of range: there are 4 heads"):
        jinterp.load_edits(path, other, allow_other_model=True)
    path = jinterp.save_edits(tmp_path / "s.json", [jinterp.Add("blocks.1.resid_post", jnp.ones(D))], toy)
    with pytest.raises(recipes.RecipeError, match=r"entry 0 \(Add at blocks\.1\.resid_post\).*vector has shape "
                                                  r"\(36,\), which does not broadcast to blocks\.1\.resid_post's shape "
                                                  r"\('batch', 'pos', 40\)"):
        jinterp.load_edits(path, other, allow_other_model=True)
    circuit = circuits.Graph.of(TOY).valid
    path = jinterp.save_edits(tmp_path / "e.json", circuits.edge_patch(toy, circuit, CORRUPT)[1], toy)
    with pytest.raises(recipes.RecipeError, match=r"entry 0 \(EdgePatch at .*EdgePatch was built for another graph: "
                                                  r"n_heads 6 vs 4, d_model 36 vs 40"):
        jinterp.load_edits(path, other, allow_other_model=True)
    patch = circuits.edge_patch(toy, circuit, CORRUPT)[1]
    tampered = eqx.tree_at(lambda p: p.slot, patch, jnp.zeros_like(patch.slot))  # every writer in one row
    with pytest.raises(ValueError, match=r"EdgePatch\.slot and rows are not what its drop makes of them"):
        jinterp.save_edits(tmp_path / "t.json", tampered, toy)
    with pytest.raises(ValueError, match=r"entry 0 \(Add at blocks\.1\.resid_post\) does not fit this model"):
        jinterp.save_edits(tmp_path / "x.json", jinterp.Add("blocks.1.resid_post", jnp.ones(D)), other)


def test_bad_files_name_the_file_entry_and_problem(toy, tmp_path):
    edits = [jinterp.Add("blocks.1.resid_post", jnp.ones(D)), jinterp.Scale("embed", 2.0)]
    path = jinterp.save_edits(tmp_path / "r.json", edits, toy)
    text, arrays = path.read_text(), (tmp_path / "r.safetensors").read_bytes()

    def fails(pattern, json_text=text, array_bytes=arrays):
        path.write_text(json_text)
        (tmp_path / "r.safetensors").write_bytes(array_bytes)
        with pytest.raises(recipes.RecipeError, match=pattern):
            jinterp.load_edits(path, toy)

    fails(r"r\.json: not a valid recipe: broken JSON .*truncated", json_text=text[: len(text) // 2])
    fails(r"r\.json: its arrays file .*r\.safetensors is not the one it was saved with", array_bytes=arrays[:-10])
    fails(r"r\.json: format 'jinterp\.edits/9'", json_text=text.replace(recipes.FORMAT, "jinterp.edits/9"))
    fails(r"r\.json: entry 1 \(Scale at embed\): edit: unknown type 'Rescale'; known: Add, Capture",
          json_text=text.replace('"type": "Scale"', '"type": "Rescale"'))
    fails(r"entry 0 \(Add at blocks\.1\.resid_post\): edit\.vector: array '0\.vector' is float32\[36\] in the "
          r"arrays file, the recipe says float32\[37\]", json_text=text.replace('"shape": [\n      36\n     ]',
                                                                               '"shape": [\n      37\n     ]'))
    document = json.loads(text)
    del document["edits"][1]["fields"]["factor"]
    fails(r"entry 1 \(Scale at embed\): edit: Scale fields do not match .*missing \['factor'\]",
          json_text=json.dumps(document))
    document = json.loads(text)
    document["arrays"] = "../elsewhere.safetensors"
    fails(r"the arrays file must be a name beside the recipe", json_text=json.dumps(document))
    path.write_text(text)
    (tmp_path / "r.safetensors").unlink()
    with pytest.raises(recipes.RecipeError, match=r"r\.json: its arrays file .* is missing"):
        jinterp.load_edits(path)
    with pytest.raises(FileNotFoundError, match="no such recipe file"):
        jinterp.load_edits(tmp_path / "none.json")


def test_unregistered_types_are_refused_when_saving(toy, tmp_path):
    class Doubling(jinterp.Edit):
        def __init__(self, site):
            self._restrict(site, None)

        def edit(self, value, at):
            return 2 * value

    with pytest.raises(TypeError, match=r"0: .*Doubling is not a registered type; register it"):
        jinterp.save_edits(tmp_path / "d.json", Doubling("embed"), toy)
    recipes.register(Doubling)
    try:
        path = jinterp.save_edits(tmp_path / "d.json", Doubling("embed"), toy)
        _assert_same_pytree(jinterp.load_edits(path, toy), (Doubling("embed"),))
    finally:
        del recipes._TYPES["Doubling"]


def test_cli_generate_with_a_recipe(tmp_path, capsys):
    from fuzz_cases import D as FUZZ_D
    from fuzz_cases import write_hf

    write_hf(tmp_path / "hf")
    model, tokenizer = jinterp.load(tmp_path / "hf")
    steer = jinterp.Add("blocks.0.resid_post", 5 * jax.random.normal(jax.random.key(0), (FUZZ_D,)))
    jinterp.save_edits(tmp_path / "steer.json", steer, model)
    args = ["generate", str(tmp_path / "hf"), "a b c", "--max-new-tokens", "4"]
    assert cli.main(args + ["--edits", str(tmp_path / "steer.json")]) == 0
    steered = capsys.readouterr().out
    expected = jinterp.generate(model, tokenizer, "a b c", 4, edits=steer).texts[0]
    assert steered == "a b c" + expected + "\n"
    assert cli.main(args) == 0
    assert capsys.readouterr().out == "a b c" + jinterp.generate(model, tokenizer, "a b c", 4).texts[0] + "\n"
    other = jinterp.save_edits(tmp_path / "other.json", steer, None)
    assert cli.main(args + ["--edits", str(other)]) == 2
    assert "made for no model" in capsys.readouterr().err
    assert cli.main(args + ["--edits", str(other), "--allow-other-model"]) == 0
    assert capsys.readouterr().out == steered


def test_readme_example_runs(capsys, tmp_path, monkeypatch):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "save_edits(" in b)
    exec(compile(example.replace("/tmp/", f"{tmp_path}/"), "README.md", "exec"), {})  # noqa: S102 - our README
    assert capsys.readouterr().out.splitlines()[-1] == "True"
