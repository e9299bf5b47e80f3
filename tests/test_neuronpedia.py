"""Neuronpedia export: what is written reads back through the documented schema (every record of
its kind, required fields present, types right) and holds the dashboard's data, for an SAE, a
transcoder and a crosscoder; malformed records are refused."""

import gzip
import json

import equinox as eqx
import jax
import numpy as np
import pytest
from conftest import TOY, random_tokens

from jinterp.sae import SAE, Crosscoder
from jinterp.sae.dashboard import latent_cards
from jinterp.sae.neuronpedia import SCHEMA, export_neuronpedia, read_neuronpedia, validate

SITE = "blocks.1.resid_post"
TOKENS = random_tokens(TOY.d_vocab, (10, 9), seed=5)
VOCAB = [f"<t{i}>" for i in range(TOY.d_vocab)]
STAMP = "2026-12-06T00:00:00+00:00"


def dictionaries(toy):
    sae = SAE.init(TOY.d_model, 20, "relu", key=jax.random.key(1), site=SITE)
    transcoder = SAE.init(TOY.d_model, 20, "relu", key=jax.random.key(2), site="blocks.1.ln2.normalized",
                          d_out=TOY.d_model, target_site="blocks.1.mlp_out")
    inner = SAE.init(2 * TOY.d_model, 20, "relu", key=jax.random.key(3), site=SITE)
    other = eqx.tree_at(lambda m: m.W_E, toy, toy.W_E * 0.9)
    return {"sae": (sae, toy), "transcoder": (transcoder, toy),
            "crosscoder": (Crosscoder(inner, ("base", "fine_tune")), (toy, other))}


@pytest.mark.parametrize("kind", ["sae", "transcoder", "crosscoder"])
def test_an_export_reads_back_through_the_schema(toy, kind, tmp_path):
    sae, model = dictionaries(toy)[kind]
    cards = latent_cards(sae, model, TOKENS, [4, 0, 11], n_contexts=3, quantiles=2, per_quantile=1, window=2)
    out = export_neuronpedia(cards, sae, tmp_path, model_id="toy", source_set=f"{kind}-20", layer=1,
                             token_strings=VOCAB, created_at=STAMP, batch_size=2, n_prompts=10,
                             n_tokens_in_prompt=9)
    assert out == tmp_path / "toy" / f"1-{kind}-20"
    assert sorted(p.name for p in (out / "features").iterdir()) == ["batch-0.jsonl.gz", "batch-1.jsonl.gz"]
    data = read_neuronpedia(out)  # every record validated
    assert [f["index"] for f in data["features"]] == ["4", "0", "11"]
    assert {r["layer"] for r in data["features"] + data["activations"] + data["explanations"]} == {f"1-{kind}-20"}
    assert data["source"][0]["id"] == f"1-{kind}-20" and data["sourceset"][0]["name"] == f"{kind}-20"
    dictionary = sae.sae if kind == "crosscoder" else sae
    for card, feature in zip(cards, data["features"]):
        # A JSON round trip of Python floats is exact.
        assert feature["maxActApprox"] == card.max_activation and feature["frac_nonzero"] == card.density
        assert feature["pos_values"] == [v for _, v in card.top_logits]
        assert feature["pos_str"] == [VOCAB[t] for t, _ in card.top_logits]
        assert feature["freq_hist_data_bar_heights"] == [float(c) for c in card.histogram[0]]
        vector = np.asarray(sae.W_dec[card.latent, 1] if kind == "crosscoder" else dictionary.W_dec[card.latent])
        np.testing.assert_array_equal(np.asarray(feature["vector"], np.float32), vector)
        if kind == "crosscoder":
            assert feature["decoder_weights_dist"] == [n for _, n in card.decoder_norms]
        mine = [a for a in data["activations"] if a["index"] == feature["index"]]
        assert len(mine) == len(card.top) + sum(len(c) for _, _, c in card.quantiles)
        top = mine[0]
        assert top["values"] == [float(v) for v in card.top[0].activations]
        assert top["tokens"] == [VOCAB[t] for t in card.top[0].tokens]
        assert top["maxValue"] == card.top[0].peak and top["binMin"] == -1
    hook = {"sae": "blocks.1.hook_resid_post", "transcoder": "blocks.1.hook_mlp_out",
            "crosscoder": "blocks.1.hook_resid_post"}[kind]
    assert {f["hookName"] for f in data["features"]} == {hook}
    assert [e["description"] for e in data["explanations"]] == ["", "", ""]  # placeholders
    assert len({a["id"] for a in data["activations"]}) == len(data["activations"])  # ids unique


def test_malformed_records_are_refused(tmp_path):
    feature = {"modelId": "toy", "layer": "1-x", "index": "3"}
    assert validate(feature, "feature") is feature
    with pytest.raises(ValueError, match=r"missing \['index'\]"):
        validate({"modelId": "toy", "layer": "1-x"}, "feature")
    with pytest.raises(ValueError, match=r"unknown \['colour'\]"):
        validate(feature | {"colour": 1}, "feature")
    with pytest.raises(ValueError, match="feature.maxActApprox must be a JSON number"):
        validate(feature | {"maxActApprox": "big"}, "feature")
    with pytest.raises(ValueError, match="kinds: release"):
        validate(feature, "neuron")
    assert set(SCHEMA) == {"release", "model", "sourceset", "source", "feature", "activation", "explanation"}
    with pytest.raises(FileNotFoundError, match="release.jsonl missing"):
        read_neuronpedia(tmp_path)
    # A tampered batch fails on reading.
    (tmp_path / "features").mkdir()
    for name in ("release", "model", "sourceset", "source"):
        (tmp_path / f"{name}.jsonl").write_text("")
    bad = json.dumps({"modelId": "toy", "layer": "1-x", "index": 3}) + "\n"
    (tmp_path / "features" / "batch-0.jsonl.gz").write_bytes(gzip.compress(bad.encode()))
    with pytest.raises(ValueError, match="feature.index must be a JSON string"):
        read_neuronpedia(tmp_path)
