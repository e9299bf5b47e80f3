"""SAE files: the SAELens layout and Gemma Scope's ``params.npz``. No pickles.

SAELens (6.x): a directory with ``cfg.json`` and ``sae_weights.safetensors`` (``W_enc``, ``b_enc``,
``W_dec``, ``b_dec``, and ``threshold`` for jumprelu). Architectures map as SAELens names them:
relu <-> "standard", topk <-> "topk", jumprelu <-> "jumprelu"; a batchtopk SAE is saved as a
jumprelu one with its global threshold on every latent (what SAELens does with its own), so it
loads back as a jumprelu SAE computing the same function. ``cfg.json``'s ``metadata.hook_name``
holds the site in TransformerLens spelling (``blocks.3.hook_resid_post``). Transcoders take
SAELens' transcoder classes: relu <-> "transcoder", jumprelu (and batchtopk, as above) <->
"jumprelu_transcoder", with ``d_out`` and the target site in ``metadata.hook_name_out``; SAELens
has no TopK transcoder, so a topk one is refused.

Gemma Scope: ``params.npz`` with ``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``: a
jumprelu SAE that does not subtract ``b_dec`` from its input.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from jinterp import names as S
from jinterp.sae.autoencoder import SAE

CONFIG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
FORMAT_VERSION = "6.0.0"  # SAELens reads configs without a version >= 6 in its older layout
TO_SAELENS = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}
FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
TRANSCODER_TO_SAELENS = {"relu": "transcoder", "batchtopk": "jumprelu_transcoder", "jumprelu": "jumprelu_transcoder"}
TRANSCODER_FROM_SAELENS = {"transcoder": "relu", "jumprelu_transcoder": "jumprelu"}
GEMMA_SCOPE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def tl_hook_name(site: str) -> str:
    """A jinterp site name in TransformerLens spelling: ``blocks.3.attn.z`` -> ``blocks.3.attn.hook_z``."""
    parsed = S.parse(site)
    kind = {"attn.scores": "attn.attn_scores", "logits": "unembed.out"}.get(parsed.kind, parsed.kind)
    *parents, last = kind.split(".")
    prefix = "" if parsed.layer is None else f"blocks.{parsed.layer}."
    return prefix + ".".join([*parents, f"hook_{last}"])


def save_saelens(sae: SAE, directory, *, model_name: str | None = None) -> Path:
    """Write ``sae`` as SAELens writes it (``SAE.load_from_disk(directory)`` reads it); returns the directory."""
    weights = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    return write_saelens(sae, directory, weights, model_name=model_name)


def write_saelens(sae: SAE, directory, weights: dict, *, model_name: str | None = None, **config) -> Path:
    """``weights`` (and ``sae``'s threshold, for a jumprelu) and SAELens' ``cfg.json`` for ``sae``, its
    entries updated with ``config``, written into ``directory`` (``save_crosscoder`` adds a model axis so)."""
    names = TRANSCODER_TO_SAELENS if sae.is_transcoder else TO_SAELENS
    if sae.architecture not in names:
        raise ValueError(f"SAELens has no {sae.architecture} transcoder ({sae.site} -> {sae.target_site}); "
                         f"transcoder architectures it reads: {', '.join(TRANSCODER_TO_SAELENS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    architecture = names[sae.architecture]
    if architecture.startswith("jumprelu"):
        weights = weights | {"threshold": sae.threshold}
    metadata = {"sae_lens_version": FORMAT_VERSION, "sae_lens_training_version": FORMAT_VERSION,
                "hook_name": None if sae.site is None else tl_hook_name(sae.site), "model_name": model_name,
                "written_by": "jinterp", "jinterp_architecture": sae.architecture}
    if sae.is_transcoder:
        metadata["hook_name_out"] = None if sae.target_site is None else tl_hook_name(sae.target_site)
    written = {"d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": str(sae.W_enc.dtype), "device": "cpu",
               "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": "none",
               "reshape_activations": "hook_z" if sae.site and S.parse(sae.site).kind == "attn.z" else "none",
               "metadata": metadata, "architecture": architecture}
    if architecture == "topk":
        written |= {"k": sae.k, "rescale_acts_by_decoder_norm": False}
    if sae.is_transcoder:
        written["d_out"] = sae.d_out
    save_file({name: np.ascontiguousarray(np.asarray(value)) for name, value in weights.items()},
              str(directory / WEIGHTS))
    (directory / CONFIG).write_text(json.dumps(written | config, indent=2))
    return directory


def load_saelens(directory, *, site: str | None = None, target_site: str | None = None) -> SAE:
    """Read an SAE or transcoder directory written by SAELens (``save_model``) or by ``save_saelens``.

    ``site`` (and ``target_site``, for a transcoder) override the ones read from ``hook_name`` (and
    ``hook_name_out``). Refuses what it would get wrong: an architecture other than standard, topk,
    jumprelu, transcoder or jumprelu_transcoder (a skip transcoder's ``W_skip`` has no place in
    jinterp's SAE), or a ``normalize_activations`` other than "none" (its scale factor is not in
    the file; fold it in SAELens first).
    """
    directory = Path(directory)
    missing = [name for name in (CONFIG, WEIGHTS) if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} is not an SAELens SAE directory: {', '.join(missing)} missing")
    config = json.loads((directory / CONFIG).read_text())
    architecture = config.get("architecture", "standard")
    known = FROM_SAELENS | TRANSCODER_FROM_SAELENS
    if architecture not in known:
        raise ValueError(f"SAELens architecture {architecture!r} in {directory / CONFIG} is not supported; "
                         f"valid: {', '.join(known)}")
    normalize = config.get("normalize_activations") or "none"
    if normalize != "none":
        raise ValueError(f"{directory / CONFIG} has normalize_activations={normalize!r}: the SAE expects rescaled "
                         "inputs whose scale is not stored; fold it into the weights first "
                         "(SAELens: sae.fold_activation_norm_scaling_factor(factor); sae.save_model(...))")
    weights = {name: jnp.asarray(value) for name, value in load_file(str(directory / WEIGHTS)).items()}
    metadata = config.get("metadata") or {}
    hook_name = metadata.get("hook_name") or config.get("hook_name") or config.get("hook_point")
    if site is None and hook_name is not None:
        site = S.parse(hook_name).name
    transcoder = architecture in TRANSCODER_FROM_SAELENS
    hook_name_out = metadata.get("hook_name_out") or config.get("hook_name_out")
    if transcoder and target_site is None and hook_name_out is not None:
        target_site = S.parse(hook_name_out).name
    k = config.get("k") if architecture == "topk" else None
    if architecture == "topk" and config.get("rescale_acts_by_decoder_norm"):
        weights = _fold_decoder_norms(weights)  # the same latents, computed with unit decoder rows
    return SAE(weights["W_enc"], weights["b_enc"], weights["W_dec"], weights["b_dec"], weights.get("threshold"),
               architecture=known[architecture], k=None if k is None else int(k),
               apply_b_dec_to_input=False if transcoder else bool(config.get("apply_b_dec_to_input", True)),
               site=site, target_site=target_site if transcoder else None)


def _fold_decoder_norms(weights: dict) -> dict:
    """A topk SAE that rescales pre-activations by decoder norms, as one with unit decoder rows."""
    norms = jnp.linalg.norm(weights["W_dec"], axis=-1)
    return weights | {"W_enc": weights["W_enc"] * norms, "b_enc": weights["b_enc"] * norms,
                      "W_dec": weights["W_dec"] / norms[:, None]}


def save_gemma_scope(sae: SAE, path) -> Path:
    """Write ``params.npz`` in Gemma Scope's layout (a file path, or a directory to hold ``params.npz``).
    A relu SAE is written as a jumprelu with threshold 0 (the same function); a topk SAE cannot be."""
    if sae.architecture == "topk":
        raise ValueError("A topk SAE has no Gemma Scope (JumpReLU) form: its sparsity is not a threshold per latent")
    path = Path(path)
    if path.suffix != ".npz":
        path = path / "params.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    sae = sae.without_input_b_dec()
    threshold = jnp.zeros(sae.d_sae, sae.W_enc.dtype) if sae.threshold is None else sae.threshold
    arrays = {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_enc": sae.b_enc, "b_dec": sae.b_dec, "threshold": threshold}
    np.savez(path, **{name: np.asarray(value) for name, value in arrays.items()})
    return path


def load_gemma_scope(path, *, site: str | None = None) -> SAE:
    """Read a Gemma Scope ``params.npz`` (a file, or a directory holding one) as a jumprelu SAE."""
    path = Path(path)
    if path.is_dir():
        path = path / "params.npz"
    with np.load(path, allow_pickle=False) as data:
        found = {name.replace("w_", "W_", 1) if name.startswith("w_") else name: data[name] for name in data.files}
    missing = [name for name in GEMMA_SCOPE_KEYS if name not in found]
    if missing:
        raise ValueError(f"{path} lacks {missing}; a Gemma Scope params.npz has {list(GEMMA_SCOPE_KEYS)}, "
                         f"found {sorted(found)}")
    arrays = [jnp.asarray(found[name]) for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")]
    return SAE(*arrays, architecture="jumprelu", apply_b_dec_to_input=False, site=site)
