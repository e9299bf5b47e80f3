"""Export feature dashboards in Neuronpedia's import layout.

    cards = latent_cards(sae, model, tokens, "density", n_latents=100, token_strings=tokenizer)
    export_neuronpedia(cards, sae, "exports", model_id="smollm2-135m", source_set="jinterp-res-2k",
                       layer=15, token_strings=tokenizer)

Neuronpedia (github.com/hijohnnylin/neuronpedia, ``utils/neuronpedia-utils``) imports a source's
dashboards from an export directory ``<model_id>/<layer>-<source_set>/`` holding one JSON object per
line: ``release.jsonl``, ``model.jsonl``, ``sourceset.jsonl``, ``source.jsonl`` (one record each)
and gzipped batches ``features/batch-N.jsonl.gz`` and ``activations/batch-N.jsonl.gz`` (its
converter from SAEDashboard output, ``convert-saedashboard-to-neuronpedia-export.py``, writes
these). ``explanations/batch-N.jsonl.gz`` holds one placeholder explanation per feature (empty
``description``) in its ``Explanation`` record, for a person or an auto-interpretation run to fill.
The records' fields are those of its ``db_models`` dataclasses, transcribed in ``SCHEMA`` (name ->
(JSON type, required)); ``validate`` checks a record against it and ``read_neuronpedia`` reads an
export back.

How jinterp's dashboard data maps: a feature's ``index`` is the latent's (a string, as there),
``layer`` the source id ``<layer>-<source_set>``, ``maxActApprox`` the largest activation seen,
``frac_nonzero`` the density, ``pos_str``/``pos_values`` and ``neg_str``/``neg_values`` the logit
effects, ``freq_hist_data_bar_values``/``heights`` the activation histogram (bin centres in
activation units, counts), ``vector`` the decoder row (a transcoder's writes into its target site,
``hookName`` the site it steers, in TransformerLens spelling). A crosscoder's feature carries the
decoder row of ``vector_model`` (default the last model) and its per-model decoder norms in
``decoder_weights_dist`` (the field SAEDashboard fills with the decoder's weight over components; in
the crosscoder's model order). Each context is an activation record: ``tokens`` as strings,
``values``, ``maxValue``/``maxValueTokenIndex``/``minValue``, and for the contexts sampled across
quantiles their interval in ``binMin``/``binMax`` (top contexts: ``binMin = binMax = -1``).
"""

from __future__ import annotations

import datetime
import gzip
import json
from pathlib import Path

import numpy as np

from jinterp.sae.autoencoder import SAE
from jinterp.sae.crosscoder import Crosscoder
from jinterp.sae.dashboard import LatentCard, _token_text
from jinterp.sae.saving import tl_hook_name

STR, INT, NUM, BOOL, LIST = "string", "integer", "number", "boolean", "array"
# name -> (JSON type, required): Neuronpedia's db_models dataclasses (fields without a default are required).
SCHEMA: dict[str, dict[str, tuple[str, bool]]] = {
    "release": {"name": (STR, True), "description": (STR, True), "creatorName": (STR, True),
                "creatorId": (STR, True), "visibility": (STR, False), "isNewUi": (BOOL, False),
                "featured": (BOOL, False), "descriptionShort": (STR, False), "urls": (LIST, False),
                "creatorEmail": (STR, False), "creatorNameShort": (STR, False),
                "defaultSourceSetName": (STR, False), "defaultSourceId": (STR, False),
                "defaultUmapSourceIds": (LIST, False), "createdAt": (STR, False)},
    "model": {"id": (STR, True), "instruct": (BOOL, True), "creatorId": (STR, True), "displayNameShort": (STR, False),
              "displayName": (STR, False), "tlensId": (STR, False), "dimension": (INT, False),
              "visibility": (STR, False), "defaultSourceSetName": (STR, False), "defaultSourceId": (STR, False),
              "inferenceEnabled": (BOOL, False), "layers": (INT, False), "neuronsPerLayer": (INT, False),
              "createdAt": (STR, False), "owner": (STR, False), "updatedAt": (STR, False), "website": (STR, False)},
    "sourceset": {"modelId": (STR, True), "name": (STR, True), "creatorId": (STR, True),
                  "hasDashboards": (BOOL, False), "visibility": (STR, False), "description": (STR, False),
                  "type": (STR, False), "creatorName": (STR, False), "urls": (LIST, False),
                  "creatorEmail": (STR, False), "releaseName": (STR, False), "defaultOfModelId": (STR, False),
                  "defaultRange": (INT, False), "defaultShowBreaks": (BOOL, False), "showDfa": (BOOL, False),
                  "showCorrelated": (BOOL, False), "showHeadAttribution": (BOOL, False), "showUmap": (BOOL, False),
                  "createdAt": (STR, False)},
    "source": {"id": (STR, True), "modelId": (STR, True), "setName": (STR, True), "creatorId": (STR, True),
               "hasDashboards": (BOOL, False), "inferenceEnabled": (BOOL, False), "inferenceHosts": (LIST, False),
               "saelensConfig": (STR, False), "saelensRelease": (STR, False), "saelensSaeId": (STR, False),
               "hfRepoId": (STR, False), "hfFolderId": (STR, False), "visibility": (STR, False),
               "defaultOfModelId": (STR, False), "hasUmap": (BOOL, False), "hasUmapLogSparsity": (BOOL, False),
               "hasUmapClusters": (BOOL, False), "num_prompts": (INT, False), "num_tokens_in_prompt": (INT, False),
               "dataset": (STR, False), "notes": (STR, False), "createdAt": (STR, False)},
    "feature": {"modelId": (STR, True), "layer": (STR, True), "index": (STR, True), "creatorId": (STR, False),
                "createdAt": (STR, False), "maxActApprox": (NUM, False), "hasVector": (BOOL, False),
                "vector": (LIST, False), "vectorLabel": (STR, False), "vectorDefaultSteerStrength": (NUM, False),
                "hookName": (STR, False), "topkCosSimIndices": (LIST, False), "topkCosSimValues": (LIST, False),
                "neuron_alignment_indices": (LIST, False), "neuron_alignment_values": (LIST, False),
                "neuron_alignment_l1": (LIST, False), "correlated_neurons_indices": (LIST, False),
                "correlated_neurons_pearson": (LIST, False), "correlated_neurons_l1": (LIST, False),
                "correlated_features_indices": (LIST, False), "correlated_features_pearson": (LIST, False),
                "correlated_features_l1": (LIST, False), "neg_str": (LIST, False), "neg_values": (LIST, False),
                "pos_str": (LIST, False), "pos_values": (LIST, False), "frac_nonzero": (NUM, False),
                "freq_hist_data_bar_heights": (LIST, False), "freq_hist_data_bar_values": (LIST, False),
                "logits_hist_data_bar_heights": (LIST, False), "logits_hist_data_bar_values": (LIST, False),
                "decoder_weights_dist": (LIST, False)},
    "activation": {"id": (STR, True), "tokens": (LIST, True), "index": (STR, True), "layer": (STR, True),
                   "modelId": (STR, True), "maxValue": (NUM, True), "maxValueTokenIndex": (INT, True),
                   "minValue": (NUM, True), "values": (LIST, True), "creatorId": (STR, True),
                   "dataSource": (STR, False), "dataIndex": (STR, False), "dfaValues": (LIST, False),
                   "dfaTargetIndex": (INT, False), "dfaMaxValue": (NUM, False), "createdAt": (STR, False),
                   "lossValues": (LIST, False), "logitContributions": (STR, False), "binMin": (NUM, False),
                   "binMax": (NUM, False), "binContains": (NUM, False), "qualifyingTokenIndex": (INT, False)},
    "explanation": {"id": (STR, True), "modelId": (STR, True), "layer": (STR, True), "index": (STR, True),
                    "description": (STR, True), "authorId": (STR, True), "embedding": (LIST, False),
                    "triggeredById": (STR, False), "typeName": (STR, False), "explanationModelName": (STR, False),
                    "notes": (STR, False), "createdAt": (STR, False)},
}
SINGLE = ("release", "model", "sourceset", "source")  # one record each, in <kind>.jsonl
BATCHED = ("features", "activations", "explanations")  # <dir>/batch-N.jsonl.gz
KIND = {"features": "feature", "activations": "activation", "explanations": "explanation"}
_TYPES = {STR: str, INT: int, NUM: (int, float), BOOL: bool, LIST: list}


def validate(record: dict, kind: str) -> dict:
    """Raise unless ``record`` is a ``kind`` record of ``SCHEMA``: every required field, no unknown
    field, each value of its JSON type (or null where optional). Returns the record."""
    if kind not in SCHEMA:
        raise ValueError(f"Unknown Neuronpedia record kind {kind!r}; kinds: {', '.join(SCHEMA)}")
    fields = SCHEMA[kind]
    missing = [name for name, (_, required) in fields.items() if required and name not in record]
    unknown = sorted(set(record) - set(fields))
    if missing or unknown:
        raise ValueError(f"Not a Neuronpedia {kind} record: missing {missing}, unknown {unknown}")
    for name, value in record.items():
        json_type, required = fields[name]
        if value is None and not required:
            continue
        if not isinstance(value, _TYPES[json_type]) or (json_type in (INT, NUM) and isinstance(value, bool)):
            raise ValueError(f"Neuronpedia {kind}.{name} must be a JSON {json_type}, got {value!r:.80}")
    return record


def export_neuronpedia(cards: list[LatentCard], sae, directory, *, model_id: str, source_set: str, layer: int,
                       token_strings=None, creator: str = "jinterp", release: str | None = None,
                       description: str = "", dataset: str | None = None, n_tokens_in_prompt: int | None = None,
                       n_prompts: int | None = None, vector_model: int | str = -1, batch_size: int = 128,
                       created_at: str | None = None) -> Path:
    """Write ``cards`` (from ``latent_cards``) of ``sae`` (an SAE, transcoder or ``Crosscoder``) as a
    Neuronpedia export; returns the source's directory ``directory/<model_id>/<layer>-<source_set>``.

    ``token_strings`` as for ``dashboard`` (Neuronpedia stores tokens as strings). ``release``
    (default ``source_set``) names the release; ``dataset``, ``n_prompts``, ``n_tokens_in_prompt``
    describe the tokens. ``created_at`` (ISO 8601; default now) stamps every record."""
    for name, value in {"model_id": model_id, "source_set": source_set}.items():
        if not isinstance(value, str) or not value or "/" in value:
            raise ValueError(f"{name} must be a non-empty string without '/', got {value!r}")
    if not isinstance(sae, SAE | Crosscoder):
        raise ValueError(f"export_neuronpedia takes an SAE, a transcoder or a Crosscoder, got {type(sae).__name__}")
    stamp = created_at or datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
    source_id = f"{int(layer)}-{source_set}"
    out = Path(directory) / model_id / source_id
    out.mkdir(parents=True, exist_ok=True)
    dictionary = sae.sae if isinstance(sae, Crosscoder) else sae
    release = release or source_set
    kind = "crosscoder" if isinstance(sae, Crosscoder) else "transcoder" if dictionary.is_transcoder else "SAE"
    singles = {
        "release": {"name": release, "description": description or f"jinterp {kind}", "creatorName": creator,
                    "creatorId": creator, "visibility": "PUBLIC", "urls": [], "createdAt": stamp},
        "model": {"id": model_id, "instruct": False, "creatorId": creator, "displayNameShort": model_id,
                  "displayName": model_id, "visibility": "PUBLIC", "createdAt": stamp, "updatedAt": stamp},
        "sourceset": {"modelId": model_id, "name": source_set, "creatorId": creator, "creatorName": creator,
                      "releaseName": release, "visibility": "PUBLIC",
                      "description": description or f"{kind} at {dictionary.site} ({dictionary.d_sae} latents)",
                      "createdAt": stamp},
        "source": {"id": source_id, "modelId": model_id, "setName": source_set, "creatorId": creator,
                   "visibility": "PUBLIC", "dataset": dataset, "num_prompts": n_prompts,
                   "num_tokens_in_prompt": n_tokens_in_prompt, "createdAt": stamp,
                   "notes": None if not isinstance(sae, Crosscoder) else
                   f"crosscoder over models {list(sae.models)}; decoder_weights_dist: per-model decoder norms"},
    }
    for name, record in singles.items():
        (out / f"{name}.jsonl").write_text(json.dumps(validate(record, name), allow_nan=False) + "\n")

    if isinstance(sae, Crosscoder):
        m = sae.model_index(vector_model if vector_model != -1 else sae.n_models - 1)
        vectors, hook = np.asarray(sae.W_dec[:, m]), dictionary.site
    else:
        vectors, hook = np.asarray(dictionary.W_dec), dictionary.target_site or dictionary.site
    hook_name = None if hook is None else tl_hook_name(hook)
    records = {"features": [], "activations": [], "explanations": []}
    for card in cards:
        index = str(card.latent)
        counts, edges = card.histogram
        centres = 10 ** ((edges[:-1] + edges[1:]) / 2) if len(edges) else np.zeros(0)
        pos, neg = card.top_logits, card.bottom_logits
        feature = {"modelId": model_id, "layer": source_id, "index": index, "creatorId": creator,
                   "createdAt": stamp, "maxActApprox": card.max_activation, "hasVector": True,
                   "vector": [float(x) for x in vectors[card.latent]], "hookName": hook_name,
                   "vectorDefaultSteerStrength": card.max_activation,
                   "pos_str": _token_text(token_strings, [t for t, _ in pos]), "pos_values": [v for _, v in pos],
                   "neg_str": _token_text(token_strings, [t for t, _ in neg]), "neg_values": [v for _, v in neg],
                   "frac_nonzero": card.density, "freq_hist_data_bar_heights": [float(c) for c in counts],
                   "freq_hist_data_bar_values": [float(c) for c in centres],
                   "decoder_weights_dist": [] if card.decoder_norms is None else [n for _, n in card.decoder_norms]}
        records["features"].append(feature)
        contexts = [(-1.0, -1.0, c) for c in card.top]
        contexts += [(low, high, c) for low, high, group in card.quantiles for c in group]
        for k, (low, high, context) in enumerate(contexts):
            values = [float(v) for v in context.activations]
            peak = int(np.argmax(values))
            records["activations"].append({
                "id": f"{model_id}-{source_id}-{index}-{k}", "tokens": _token_text(token_strings, context.tokens),
                "index": index, "layer": source_id, "modelId": model_id, "maxValue": values[peak],
                "maxValueTokenIndex": peak, "minValue": min(values), "values": values, "creatorId": creator,
                "createdAt": stamp, "binMin": low, "binMax": high, "qualifyingTokenIndex": peak,
                "dataIndex": f"{context.sequence}:{context.start}"})
        records["explanations"].append({"id": f"{model_id}-{source_id}-{index}-explanation", "modelId": model_id,
                                        "layer": source_id, "index": index, "description": "",
                                        "authorId": creator, "typeName": "placeholder", "createdAt": stamp})
    for folder, items in records.items():
        (out / folder).mkdir(exist_ok=True)
        for old in (out / folder).glob("batch-*.jsonl.gz"):
            old.unlink()
        for b, start in enumerate(range(0, len(items), batch_size)):
            lines = "".join(json.dumps(validate(r, KIND[folder]), allow_nan=False) + "\n"
                            for r in items[start:start + batch_size])
            (out / folder / f"batch-{b}.jsonl.gz").write_bytes(gzip.compress(lines.encode(), mtime=0))
    return out


def read_neuronpedia(source_directory) -> dict[str, list[dict]]:
    """Read an export's source directory (as ``export_neuronpedia`` returns) back, every record checked
    by ``validate``: ``{"release": [...], "model": [...], "sourceset": [...], "source": [...],
    "features": [...], "activations": [...], "explanations": [...]}``."""
    directory = Path(source_directory)
    found = {}
    for name in SINGLE:
        path = directory / f"{name}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not a Neuronpedia export source directory: {path.name} missing")
        found[name] = [validate(json.loads(line), name) for line in path.read_text().splitlines() if line]
    for folder in BATCHED:
        files = sorted((directory / folder).glob("batch-*.jsonl.gz"), key=lambda p: int(p.name[6:-9]))
        found[folder] = [validate(json.loads(line), KIND[folder]) for path in files
                         for line in gzip.decompress(path.read_bytes()).decode().splitlines() if line]
    return found
