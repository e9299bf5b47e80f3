"""Intervention recipes: a list of edits saved to files, shared, and rerun exactly.

    jinterp.save_edits("steer.json", [jinterp.Add("blocks.10.resid_post", v, scale=4.0)], model)
    edits = jinterp.load_edits("steer.json", model)   # refused on other weights
    jinterp.run(model, tokens, edits="steer.json")     # run and generate take the path itself
    # jinterp generate smollm2-135m "The capital of France is" --edits steer.json

A recipe is two files: ``steer.json`` holds the structure — the format version, the fingerprint of
the model the edits were made for, and every edit's type and fields (site kinds, flags, an SAE's
architecture, each array by name, dtype and shape) — and ``steer.safetensors`` beside it holds every
array, bit for bit in its own dtype (JAX's weak types too). Loading unpickles nothing: each edit
names a type from a registry (every built-in intervention; ``register`` adds your own), and is
rebuilt field by field as that type declares them, so the loaded edits are the same pytree (same
structure, same leaves) as the saved ones.

Loading checks, and names the file, the entry and the mismatch when it fails: the JSON parses and
has this format; the arrays file is the one the JSON was written with (its sha256); every type is
known and every field present; every array has its recorded dtype and shape; and, given a model,
that the recipe was made for it (its fingerprint: the config and every weight; ``allow_other_model``
skips this) and that every edit fits its sites (site kinds, layer/position/head ranges, value
shapes, an SAE's width, an edge patch's graph).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import weakref
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from jinterp import interventions as iv
from jinterp.models.config import Config

FORMAT = "jinterp.edits/1"
_TYPES: dict[str, type] = {}


class RecipeError(ValueError):
    """A recipe file that cannot be loaded or does not fit the model: names the file and the entry."""

    def __init__(self, path, message: str, entry: str | None = None):
        self.path, self.entry = Path(path), entry
        super().__init__(f"{path}: {'' if entry is None else entry + ': '}{message}")


def register(cls: type) -> type:
    """Let recipes save and load ``cls`` (an ``eqx.Module``: an intervention, or a module one holds);
    usable as a decorator. Built-in interventions, ``SAE`` and ``Config`` are registered already."""
    if not (isinstance(cls, type) and issubclass(cls, eqx.Module)):
        raise TypeError(f"register takes an equinox Module class (an Intervention subclass), got {cls!r}")
    known = _types().get(cls.__name__)
    if known is not None and known is not cls:
        raise ValueError(f"Another class named {cls.__name__!r} is registered already ({known.__module__}."
                         f"{known.__qualname__}); recipes name types by class name, so rename one")
    _TYPES[cls.__name__] = cls
    return cls


def _types() -> dict[str, type]:
    if not _TYPES:  # the built-ins, imported late: circuits and sae import the core this module serves
        from jinterp.circuits import EdgePatch
        from jinterp.sae.autoencoder import SAE
        from jinterp.sae.splice import SAESplice

        for cls in (iv.Replace, iv.Add, iv.Scale, iv.Zero, iv.Project, iv.Interchange, iv.Capture, SAESplice,
                    EdgePatch, SAE):
            _TYPES[cls.__name__] = cls
    return _TYPES


# --- writing ---------------------------------------------------------------------------------------

class _Writer:
    """Module trees -> JSON-ready structure, their arrays collected by key."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}

    def encode(self, value, key: str):
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"float": repr(value)}
        if isinstance(value, (jax.Array, np.ndarray, np.generic)):
            return self.array(value, key)
        if isinstance(value, Config):
            return {"config": value.to_dict()}
        if isinstance(value, (tuple, list)):
            return {type(value).__name__: [self.encode(v, f"{key}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, dict):
            bad = [k for k in value if not isinstance(k, str)]
            if bad:
                raise TypeError(f"{key}: a dict with a non-string key {bad[0]!r} cannot be saved")
            return {"dict": {k: self.encode(v, f"{key}.{k}") for k, v in value.items()}}
        if isinstance(value, eqx.Module):
            name = type(value).__name__
            if _types().get(name) is not type(value):
                raise TypeError(f"{key}: {type(value).__module__}.{type(value).__qualname__} is not a registered "
                                f"type; register it with jinterp.recipes.register({name}) (also before loading)")
            fields = {f.name: self.encode(getattr(value, f.name), f"{key}.{f.name}") for f in dataclasses.fields(value)}
            return {"type": name, "fields": fields}
        raise TypeError(f"{key}: a {type(value).__name__} cannot be saved in a recipe (arrays, numbers, strings, "
                        f"tuples, dicts, configs and registered modules can)")

    def array(self, value, key: str) -> dict:
        if isinstance(value, jax.core.Tracer):
            raise TypeError(f"{key} is a traced value (inside jit, vmap or grad); save edits built outside them")
        host = np.asarray(value)
        self.arrays[key] = np.array(host, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
        node = {"array": key, "dtype": host.dtype.name, "shape": list(host.shape)}
        if isinstance(value, np.generic):
            node["numpy"] = "scalar"
        elif isinstance(value, np.ndarray):
            node["numpy"] = "array"
        elif value.weak_type:
            node["weak_type"] = True
        return node


def _describe(intervention: iv.Intervention) -> str:
    from jinterp.core import _spelled

    return f"{type(intervention).__name__} at {_spelled(intervention, intervention.kinds()[-1])}"


def save_edits(path, edits, model, *, note: str = "") -> Path:
    """Save ``edits`` (an intervention or a list, as ``jinterp.run`` takes them), made for ``model``, as a
    recipe: ``path`` (JSON) and the arrays in ``path`` with the suffix ``.safetensors``. Both are written
    to temporary files and renamed into place. ``note``: free text kept in the JSON. Returns ``path``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        raise ValueError(f"{path}: name the recipe's JSON file (e.g. {path.with_suffix('.json').name}); its arrays go "
                         f"beside it in {path.name}")
    arrays_path = path.with_suffix(".safetensors")
    edits = iv.flatten(edits)
    specs = None if model is None else _specs(model)
    if specs is not None:
        for i, edit in enumerate(edits):
            try:
                _check_fit(edit, specs, model)
            except (ValueError, TypeError) as error:
                raise ValueError(f"entry {i} ({_describe(edit)}) does not fit this model: {error}") from error
    writer = _Writer()
    entries = [dict(describe=_describe(edit), **writer.encode(edit, str(i))) for i, edit in enumerate(edits)]
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays_tmp = arrays_path.with_name(f".{arrays_path.name}.{os.getpid()}.tmp")
    save_file(writer.arrays, str(arrays_tmp), metadata={"format": FORMAT})
    digest = _sha256(arrays_tmp)
    document = {"format": FORMAT, "note": note, "model": None if model is None else _model_info(model),
                "arrays": arrays_path.name, "arrays_sha256": digest, "edits": entries}
    json_tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    json_tmp.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")
    os.replace(arrays_tmp, arrays_path)
    os.replace(json_tmp, path)
    return path


# --- reading ---------------------------------------------------------------------------------------

class _Reader:
    """JSON structure + arrays -> module trees; every problem raised with the file and the entry."""

    def __init__(self, path: Path, arrays: dict[str, np.ndarray], entry: str):
        self.path, self.arrays, self.entry = path, arrays, entry

    def fail(self, message: str):
        raise RecipeError(self.path, message, self.entry)

    def decode(self, node, where: str):
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if not isinstance(node, dict):
            self.fail(f"{where}: unexpected JSON value {node!r}")
        if "array" in node:
            return self.array(node, where)
        if "type" in node:
            return self.module(node, where)
        if len(node) != 1:
            self.fail(f"{where}: unexpected JSON object with keys {sorted(node)}")
        (tag, body), = node.items()
        if tag in ("tuple", "list") and isinstance(body, list):
            items = [self.decode(v, f"{where}[{i}]") for i, v in enumerate(body)]
            return tuple(items) if tag == "tuple" else items
        if tag == "dict" and isinstance(body, dict):
            return {k: self.decode(v, f"{where}.{k}") for k, v in body.items()}
        if tag == "float" and body in ("nan", "inf", "-inf"):
            return float(body)
        if tag == "config" and isinstance(body, dict):
            try:
                return Config.from_dict(body)
            except (TypeError, ValueError) as error:
                self.fail(f"{where}: not a valid model config: {error}")
        self.fail(f"{where}: unknown value tag {tag!r} (expected one of array, type, tuple, list, dict, float, config)")

    def module(self, node, where: str):
        name, fields = node.get("type"), node.get("fields")
        types = _types()
        cls = types.get(name)
        if cls is None:
            self.fail(f"{where}: unknown type {name!r}; known: {', '.join(sorted(types))} (a type of your own: "
                      f"jinterp.recipes.register(YourType) before loading)")
        if not isinstance(fields, dict):
            self.fail(f"{where}: {name} has no 'fields' object")
        declared = [f.name for f in dataclasses.fields(cls)]
        missing, extra = [f for f in declared if f not in fields], sorted(set(fields) - set(declared))
        if missing or extra:
            self.fail(f"{where}: {name} fields do not match this jinterp's {name} (missing {missing}, unknown {extra})")
        obj = object.__new__(cls)  # field by field, as equinox itself rebuilds a module from its pytree
        for field in declared:
            object.__setattr__(obj, field, self.decode(fields[field], f"{where}.{field}"))
        for klass in reversed(cls.__mro__):
            check = klass.__dict__.get("__check_init__")
            if check is not None:
                try:
                    check(obj)
                except (ValueError, TypeError) as error:
                    self.fail(f"{where}: {error}")
        return obj

    def array(self, node, where: str):
        key = node["array"]
        if key not in self.arrays:
            self.fail(f"{where}: array {key!r} is missing from the arrays file")
        value = self.arrays[key]
        dtype, shape = node.get("dtype"), tuple(node.get("shape", ()))
        if value.dtype.name != dtype or value.shape != shape:
            self.fail(f"{where}: array {key!r} is {value.dtype.name}{list(value.shape)} in the arrays file, the "
                      f"recipe says {dtype}{list(shape)}")
        kind = node.get("numpy")
        if kind == "scalar":
            return value[()]
        if kind == "array":
            return value
        if value.dtype == np.float64 and not jax.config.read("jax_enable_x64"):
            self.fail(f"{where}: array {key!r} is float64, which JAX keeps only in 64-bit mode: call "
                      f"jax.config.update('jax_enable_x64', True) first")
        return _weak(jnp.asarray(value)) if node.get("weak_type") else jnp.asarray(value)


def _weak(x: jax.Array) -> jax.Array:
    """The same values as a weakly typed array (how JAX holds a Python scalar), so the loaded pytree
    traces exactly as the saved one did."""
    if x.ndim == 0 and jnp.asarray(x.item()).dtype == x.dtype:
        return jnp.asarray(x.item())
    from jax._src.lax.lax import _convert_element_type  # no public way to set weak_type on an array

    return _convert_element_type(x, weak_type=True)


def load_edits(path, model=None, *, allow_other_model: bool = False) -> tuple[iv.Intervention, ...]:
    """The edits saved at ``path`` by ``save_edits``, as a tuple ``jinterp.run`` takes.

    With ``model``: refused (``RecipeError``) unless the recipe was made for this model — the same
    config and weights (fingerprint) — or ``allow_other_model=True``; either way every edit is checked
    to fit the model's sites. Without a model only the files themselves are checked.
    """
    return _load(Path(path), model, allow_other_model, None if model is None else _specs(model))


def _load(path: Path, model, allow_other_model: bool, specs):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such recipe file")
    try:
        document = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise RecipeError(path, "not a recipe: not UTF-8 text (a recipe is the JSON file save_edits wrote)") from None
    except json.JSONDecodeError as error:
        raise RecipeError(path, f"not a valid recipe: broken JSON ({error.msg} at line {error.lineno}, column "
                                f"{error.colno}); a truncated or hand-edited file?") from None
    if not isinstance(document, dict) or "format" not in document:
        raise RecipeError(path, "not a recipe: no 'format' key (save_edits writes one)")
    if document["format"] != FORMAT:
        raise RecipeError(path, f"format {document['format']!r}; this jinterp reads {FORMAT!r}")
    for key, kind in (("arrays", str), ("arrays_sha256", str), ("edits", list)):
        if not isinstance(document.get(key), kind):
            raise RecipeError(path, f"'{key}' must be a {kind.__name__}, got {document.get(key)!r}")
    name = document["arrays"]
    if Path(name).name != name or name in ("", ".", ".."):
        raise RecipeError(path, f"the arrays file must be a name beside the recipe, got {name!r}")
    arrays_path = path.parent / name
    if not arrays_path.is_file():
        raise RecipeError(path, f"its arrays file {arrays_path} is missing (copy both files)")
    if _sha256(arrays_path) != document["arrays_sha256"]:
        raise RecipeError(path, f"its arrays file {arrays_path} is not the one it was saved with (sha256 "
                                f"differs): truncated, or replaced by another recipe's")
    try:
        arrays = load_file(str(arrays_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise RecipeError(arrays_path, f"not a readable safetensors file: {error}") from None
    made_for = document.get("model")
    if model is not None and not allow_other_model:
        here = _model_info(model)
        if made_for is None or made_for.get("fingerprint") != here["fingerprint"]:
            was = "no model" if made_for is None else \
                f"{made_for.get('describe')} ({str(made_for.get('fingerprint'))[:12]})"
            raise RecipeError(path, f"made for {was}, not this model, {here['describe']} ({here['fingerprint'][:12]}): "
                                    f"other weights, dtype or processing. Its edits may mean something else here; "
                                    f"pass allow_other_model=True (CLI: --allow-other-model) to load it anyway")
    edits = []
    for i, node in enumerate(document["edits"]):
        describe = node.get("describe", "?") if isinstance(node, dict) else "?"
        entry = f"entry {i} ({describe})"
        reader = _Reader(path, arrays, entry)
        if not isinstance(node, dict) or "type" not in node:
            reader.fail("not an intervention (no 'type')")
        edit = reader.module(node, "edit")
        if not isinstance(edit, iv.Intervention):
            reader.fail(f"a {type(edit).__name__} is not an intervention")
        if specs is not None:
            try:
                _check_fit(edit, specs, model)
            except (ValueError, TypeError) as error:
                reader.fail(f"does not fit this model: {error}")
        edits.append(edit)
    return tuple(edits)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- the model -------------------------------------------------------------------------------------

_FINGERPRINTS: dict[int, tuple[weakref.ref, str]] = {}


def fingerprint(model) -> str:
    """A sha256 of the model's config and every weight (dtype, shape and bytes); memoised per model object."""
    held = _FINGERPRINTS.get(id(model))
    if held is not None and held[0]() is model:
        return held[1]
    from jinterp.tuned_lens import model_fingerprint

    digest = model_fingerprint(model)
    with contextlib.suppress(TypeError):  # a model that takes no weak reference is not memoised
        _FINGERPRINTS[id(model)] = (weakref.ref(model), digest)
    return digest


def _model_info(model) -> dict:
    cfg = getattr(model, "cfg", None)
    if isinstance(cfg, Config):
        describe = (f"a {cfg.architecture} model with {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} "
                    f"heads, d_vocab {cfg.d_vocab}, {cfg.dtype}")
    else:
        describe = f"a {type(model).__name__}"
    return {"describe": describe, "fingerprint": fingerprint(model)}


def _specs(model):
    try:
        return model.site_specs(None)
    except (TypeError, ValueError):  # a wrapped model that needs inputs: its sites are checked when it runs
        return None


def _fits(given: tuple, site: tuple) -> bool:
    """Whether an array of shape ``given`` broadcasts to a site of shape ``site`` (symbolic sizes, such
    as ``"batch"`` and ``"pos"``, take any)."""
    return len(given) <= len(site) and all(g == 1 or not isinstance(s, int) or g == s
                                           for g, s in zip(reversed(given), reversed(site)))


def _check_fit(edit: iv.Intervention, specs, model) -> None:
    """An edit against the model's sites (``core.validate``), then the shapes of its arrays against the
    sites it reaches (what ``check`` leaves to trace time)."""
    from jinterp.circuits import EdgePatch
    from jinterp.core import validate
    from jinterp.sae.splice import SAESplice

    validate(specs, [edit])
    reached = iv.reached(edit, [s for s in specs.values() if s.kind == edit.kinds()[-1]])
    name = type(edit).__name__
    field = edit.value_field if isinstance(edit, (iv.Replace, iv.Add, iv.Scale, iv.Interchange)) else None
    if field is not None:
        value = getattr(edit, field)
        shape = value.shape[1:] if getattr(edit, "per_layer", False) else value.shape
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise TypeError(f"{name}.{field} must be a float array, got dtype {value.dtype}")
        bad = [s for s in reached if not _fits(shape, s.shape)]
        if bad:
            raise ValueError(f"{name}.{field} has shape {tuple(shape)}, which does not broadcast to {bad[0].name}'s "
                             f"shape {bad[0].shape} (axes {bad[0].axes})")
    if isinstance(edit, (iv.Project, iv.Interchange)):
        basis = edit.basis if isinstance(edit, iv.Project) else edit.rotation
        width = {s.shape[-1] for s in reached}
        if basis.ndim != 2 or any(basis.shape[0] != w for w in width):
            raise ValueError(f"{name} {'basis' if isinstance(edit, iv.Project) else 'rotation'} has shape "
                             f"{tuple(basis.shape)}; the site's last axis has {sorted(width)} entries: expected [d, k]")
    if isinstance(edit, SAESplice):
        for what in ("scale", "shift"):
            if not _fits(getattr(edit, what).shape, ("batch", "pos", edit.sae.d_sae)):
                raise ValueError(f"SAESplice {what} has shape {getattr(edit, what).shape}; it must broadcast to the "
                                 f"latents [batch, pos, {edit.sae.d_sae}]")
    if isinstance(edit, EdgePatch):
        _check_edge_patch(edit, model)


def _check_edge_patch(edit, model) -> None:
    from jinterp.circuits import EdgePatch, Graph

    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, Config):
        raise ValueError("an EdgePatch applies to jinterp transformers only")
    sizes = ("n_layers", "n_heads", "n_kv_heads", "d_head", "d_model", "d_mlp", "attn_only", "parallel")
    differ = [f"{k} {getattr(edit.cfg, k)} vs {getattr(cfg, k)}" for k in sizes
              if getattr(edit.cfg, k) != getattr(cfg, k)]
    if differ:
        raise ValueError(f"EdgePatch was built for another graph: {', '.join(differ)} (recipe vs model)")
    expected = {"drop": Graph.of(cfg).valid.shape, "W_O": model.blocks.attn.W_O.shape}
    for field, shape in expected.items():
        if getattr(edit, field).shape != shape:
            raise ValueError(f"EdgePatch.{field} has shape {getattr(edit, field).shape}; this model's is {shape}")
    written = None if edit.written is None else edit.written.shape
    if written is not None and (len(written) != 4 or (written[0], written[3]) != (expected["drop"][0], cfg.d_model)):
        raise ValueError(f"EdgePatch.written has shape {written}; expected [{expected['drop'][0]}, batch, pos, "
                         f"{cfg.d_model}]")
    corrupt = edit.corrupt
    if not isinstance(corrupt, dict) or set(corrupt) != {"resid_pre", "mlp_in", "out", "z", "mlp_out"}:
        raise ValueError(f"EdgePatch.corrupt must hold resid_pre, mlp_in, out, z and mlp_out, got "
                         f"{sorted(corrupt) if isinstance(corrupt, dict) else type(corrupt).__name__}")
    z = corrupt["z"].shape
    if len(z) != 5 or (z[0], z[3], z[4]) != (cfg.n_layers, cfg.n_heads, cfg.d_head):
        raise ValueError(f"EdgePatch.corrupt['z'] has shape {z}; expected [{cfg.n_layers}, batch, pos, {cfg.n_heads}, "
                         f"{cfg.d_head}]")
    for kind in ("resid_pre", "mlp_in", "mlp_out"):
        if kind != "resid_pre" and (corrupt[kind] is None) == cfg.has_mlp:
            raise ValueError(f"EdgePatch.corrupt['{kind}'] is {'missing' if cfg.has_mlp else 'present'}; this model "
                             f"{'has' if cfg.has_mlp else 'has no'} MLPs")
        if corrupt[kind] is not None and corrupt[kind].shape != (cfg.n_layers, *z[1:3], cfg.d_model):
            raise ValueError(f"EdgePatch.corrupt['{kind}'] has shape {corrupt[kind].shape}; expected "
                             f"[{cfg.n_layers}, batch, pos, {cfg.d_model}]")
    made = EdgePatch(cfg, edit.drop, corrupt, edit.W_O)  # what the drop makes of the recorded writers
    if edit.rows != made.rows or not np.array_equal(edit.slot, made.slot):
        raise ValueError("EdgePatch.slot and rows are not what its drop makes of them (edited by hand?)")


# --- paths given as edits --------------------------------------------------------------------------

def is_recipe(value) -> bool:
    """A path given where edits go: a ``PathLike``, or a string naming an existing file or ending in .json."""
    return isinstance(value, os.PathLike) or (isinstance(value, str)
                                              and (value.endswith(".json") or Path(value).is_file()))


def expand(edits, model, specs=None):
    """``edits`` with every recipe path in it (the whole argument, or items of a list) loaded for ``model``."""
    if is_recipe(edits):
        return _load(Path(edits), model, False, specs)
    if isinstance(edits, (list, tuple)) and any(is_recipe(e) for e in edits):
        return tuple(_load(Path(e), model, False, specs) if is_recipe(e) else e for e in edits)
    return edits


__all__ = ["FORMAT", "RecipeError", "fingerprint", "load_edits", "register", "save_edits"]
