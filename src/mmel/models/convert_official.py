"""Import checkpoints of the official MIMIC and M3EL releases (shared/specs/official_keys.txt).

Both releases are Lightning modules with two attributes: `encoder` (HF CLIP plus two projections)
and `matcher` (the units). mmel's `MIMICModel` / `M3ELModel` use the matchers' own parameter names
and hold the two projections, so each key map is a short prefix table (`OFFICIAL_RELEASES`). Release
parameters that the mmel model has no use for (M3EL's MCLET MLPs, `logit_scale`, unused
LayerNorms; a CMN unit the chosen configuration does not build) are listed in the `ImportReport`,
never dropped silently; any other key that fits nowhere is an error. The CLIP weights under
`encoder.clip.*` can be written to a Hugging Face CLIP directory for the `clip` backbone.

Reading never executes pickled code. A release `.ckpt` holds its hyper-parameters as pickled
OmegaConf objects, which `torch.load(weights_only=True)` refuses. `read_checkpoint_tensors` reads
torch's zip format itself (`<archive>/data.pkl` plus one `<archive>/data/<key>` record per storage)
with an unpickler whose `find_class` admits only tensor rebuilding, storage types, OrderedDict and
plain containers. Every other global (OmegaConf classes, `os.system`...) becomes an inert
placeholder type that only records its arguments: the named class or function is never imported,
let alone called.
"""

from __future__ import annotations

import pickle
import shutil
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmel.core.errors import MismatchError, NotFoundError
from mmel.models.base import MelModel
from mmel.models.m3el import M3ELModel
from mmel.models.mimic import MIMICModel

CLIP_PREFIX = "encoder.clip."
# transformers < 4.31 saved these buffers; newer CLIPModel versions compute them and do not store them.
_CLIP_LEGACY_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
# files of a Hugging Face CLIP directory that are not weights (tokenizer, image processor).
_CLIP_AUXILIARY_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                         "special_tokens_map.json", "preprocessor_config.json")


# --- reading tensors without executing pickled code ----------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}
_CONTAINERS: dict[tuple[str, str], type] = {
    ("collections", "OrderedDict"): OrderedDict, ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
}


@dataclass(frozen=True, slots=True)
class _StorageType:
    """What a `torch.<Type>Storage` global reads as: its dtype only (slots + frozen: pickle cannot alter it)."""

    dtype: torch.dtype


@dataclass(frozen=True, slots=True)
class _StorageRef:
    key: str
    dtype: torch.dtype


@dataclass(frozen=True, slots=True)
class _TensorRef:
    """A tensor described by the pickle; its bytes are read only if the state dict holds it."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class UnreadObject:
    """Stands in for a pickled object of any class the reader does not admit; it only records what it got."""

    global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> UnreadObject:
        instance = super().__new__(cls)
        instance.args = args
        return instance

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value: Any) -> None:
        self.__dict__.setdefault("values", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("values", []).extend(values)

    def __repr__(self) -> str:
        return f"<unread {self.global_name}>"


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles tensors, storages and containers; every other global becomes an `UnreadObject` type."""

    def __init__(self, file: Any):
        super().__init__(file)
        self.unread_globals: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return self._rebuild_tensor      # bound methods: pickle's BUILD cannot set attributes on them
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return self._rebuild_parameter
        if (module, name) in _CONTAINERS:
            return _CONTAINERS[(module, name)]
        self.unread_globals.add(f"{module}.{name}")
        return type(f"Unread_{name}", (UnreadObject,), {"global_name": f"{module}.{name}"})

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        return _StorageRef(key=pid[2], dtype=pid[1].dtype)

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *ignored: Any) -> _TensorRef:
        """torch's `_rebuild_tensor[_v2](storage, offset, size, stride[, requires_grad, hooks, metadata])`."""
        if not (isinstance(storage, _StorageRef) and isinstance(offset, int) and _is_int_tuple(size)
                and _is_int_tuple(stride) and len(size) == len(stride)):
            raise pickle.UnpicklingError("malformed tensor record")
        return _TensorRef(storage, offset, tuple(size), tuple(stride))

    def _rebuild_parameter(self, data: Any, *ignored: Any) -> _TensorRef:
        """torch's `_rebuild_parameter[_with_state](data, requires_grad, hooks[, state])`: the data tensor."""
        if not isinstance(data, _TensorRef):
            raise pickle.UnpicklingError("malformed parameter record")
        return data


# what a malformed or hostile pickle raises while the restricted unpickler reads it
_UNREADABLE_PICKLE = (pickle.UnpicklingError, TypeError, AttributeError, ValueError, KeyError, IndexError,
                      EOFError, RecursionError)


def _is_int_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and all(isinstance(item, int) and item >= 0 for item in value)


def read_checkpoint_tensors(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict of a torch zip checkpoint (a Lightning `.ckpt`'s `state_dict`, or a plain state dict).

    Returns the tensors and the sorted names of the pickled globals that were not read (e.g. the
    OmegaConf classes of the hyper-parameters). Nothing pickled is executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise MismatchError(f"{path}: not a torch zip checkpoint (torch >= 1.6 format). mmel does not read the "
                            "legacy format; in an environment you trust, re-save it with a current torch.save")
    with zipfile.ZipFile(path) as archive:
        prefix = _archive_prefix(archive, path)
        with archive.open(prefix + "data.pkl") as pickled:
            unpickler = _RestrictedUnpickler(pickled)
            try:
                loaded = unpickler.load()
            except _UNREADABLE_PICKLE as error:
                raise MismatchError(f"{path}: the checkpoint's pickle cannot be read without executing code "
                                    f"({type(error).__name__}: {error})") from None
        references = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
        if not isinstance(references, dict) or not all(
                isinstance(k, str) and isinstance(v, _TensorRef) for k, v in references.items()):
            raise MismatchError(f"{path}: expected a state dict of tensors (or a Lightning checkpoint holding one "
                                "under 'state_dict')")
        storages: dict[str, torch.Tensor] = {}
        tensors = {name: _materialise(archive, prefix, reference, storages, path)
                   for name, reference in references.items()}
    return tensors, sorted(unpickler.unread_globals)


def _archive_prefix(archive: zipfile.ZipFile, path: Path) -> str:
    """The folder holding data.pkl (its name is arbitrary); the storages must be little-endian."""
    pickles = [name for name in archive.namelist() if name.endswith("data.pkl") and name.count("/") <= 1]
    if len(pickles) != 1:
        raise MismatchError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
    prefix = pickles[0][: -len("data.pkl")]
    if prefix + "byteorder" in archive.namelist() and archive.read(prefix + "byteorder").strip() != b"little":
        raise MismatchError(f"{path}: big-endian checkpoints are not supported")
    return prefix


def _materialise(archive: zipfile.ZipFile, prefix: str, reference: _TensorRef, storages: dict[str, torch.Tensor],
                 path: Path) -> torch.Tensor:
    """The tensor a `_TensorRef` describes, read from its storage record (each storage read once)."""
    key = reference.storage.key
    if key not in storages:
        try:
            data = bytearray(archive.read(f"{prefix}data/{key}"))
        except KeyError:
            raise MismatchError(f"{path}: storage record data/{key} is missing") from None
        dtype = reference.storage.dtype
        storages[key] = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
    try:
        return storages[key].as_strided(reference.size, reference.stride, reference.offset)
    except RuntimeError as error:
        raise MismatchError(f"{path}: a tensor does not fit its storage record data/{key} ({error})") from None


# --- the two releases' key maps -----------------------------------------------------------------

_MCLET = "an MCLETLoss MLP, instantiated but never used (models.md §3.7)"


@dataclass(frozen=True)
class OfficialRelease:
    """How one release's state dict maps onto an mmel model.

    key_prefixes:   official prefix -> mmel prefix, first match wins
    unused:         official prefix -> why the mmel model has no place for it (reported)
    optional_units: official prefix -> mmel attribute; reported as unused when the configuration does not build it
    fixed_ones:     official keys holding constants the mmel model builds in (checked to be all ones, reported)
    release_options: config values that reproduce the release's computation
    """

    name: str
    model_class: type[MelModel]
    key_prefixes: dict[str, str]
    unused: dict[str, str] = field(default_factory=dict)
    optional_units: dict[str, str] = field(default_factory=dict)
    fixed_ones: dict[str, str] = field(default_factory=dict)
    release_options: dict[str, Any] = field(default_factory=dict)


_ENCODER_PREFIXES = {"encoder.image_cls_fc.": "image_cls_fc.", "encoder.image_tokens_fc.": "image_tokens_fc."}
_MMEL_OPTIONS_OFF = {"mask_missing_images": False, "exclude_duplicate_negatives": False}

OFFICIAL_RELEASES: dict[str, OfficialRelease] = {
    "mimic": OfficialRelease(
        name="mimic", model_class=MIMICModel, key_prefixes={**_ENCODER_PREFIXES, "matcher.": ""},
        release_options=_MMEL_OPTIONS_OFF),
    "m3el": OfficialRelease(
        name="m3el", model_class=M3ELModel, key_prefixes={**_ENCODER_PREFIXES, "matcher.": ""},
        unused={"matcher.cmm.mclet_text_loss.": _MCLET, "matcher.cmmb.mclet_text_loss.": _MCLET,
                "matcher.cmmb.mclet_image_loss.": _MCLET, "matcher.mclet_text_loss.": _MCLET,
                "matcher.mclet_image_loss.": _MCLET,
                "matcher.weight_cl_loss.logit_scale": "logit_scale, defined but never used (models.md §3.7)",
                "matcher.text_fc.": "a matcher Linear the forward never uses (models.md §3.8)",
                "matcher.image_fc.": "a matcher Linear the forward never uses (models.md §3.8)",
                "matcher.scale_": "a matcher LayerNorm the forward never uses (models.md §3.8)"},
        optional_units={"matcher.cmm.": "cmm", "matcher.cmmb.": "cmmb"},
        fixed_ones={"matcher.cmm.multi_head_module.weight": "CSRA head weights: fixed ones, built in (§3.6)",
                    "matcher.cmmb.multi_head_module.weight": "CSRA head weights: fixed ones, built in (§3.6)"},
        # the release's weights were trained with the single-key branch, so they are scored with it
        release_options={**_MMEL_OPTIONS_OFF, "release_single_key_cmn_branch": True}),
}


@dataclass
class ImportReport:
    """What an import did: the config, how many tensors went where, and every release tensor left unused."""

    release: str
    source: Path
    config: dict[str, Any]
    loaded: int                                   # mmel model tensors filled
    clip_tensors: int                             # encoder.clip.* tensors (exportable as a CLIP directory)
    unused: dict[str, str]                        # official key -> why mmel does not use it
    fixed: dict[str, str]                         # official key -> the constant mmel builds in
    unread_globals: list[str]                     # pickled classes/functions that were not read (never executed)
    out_dir: Path | None = None

    def summary(self) -> str:
        lines = [f"imported official {self.release} checkpoint {self.source}"
                 + (f" into {self.out_dir}" if self.out_dir else ""),
                 f"  {self.loaded} model tensors loaded; {self.clip_tensors} encoder.clip.* tensors "
                 "(export them with --clip-out)",
                 f"  config: {self.config}"]
        if self.fixed:
            lines.append(f"  built-in constants checked ({len(self.fixed)}):")
            lines += [f"    {key}: {why}" for key, why in sorted(self.fixed.items())]
        if self.unused:
            lines.append(f"  release tensors not used by the mmel model ({len(self.unused)}):")
            lines += [f"    {key}: {why}" for key, why in sorted(self.unused.items())]
        if self.unread_globals:
            lines.append(f"  pickled objects not read (never executed): {', '.join(self.unread_globals)}")
        return "\n".join(lines)


def _release(name: str) -> OfficialRelease:
    if name not in OFFICIAL_RELEASES:
        raise NotFoundError(f"unknown official release {name!r}; available: {', '.join(sorted(OFFICIAL_RELEASES))}")
    return OFFICIAL_RELEASES[name]


def split_official_state_dict(release: OfficialRelease, state: Mapping[str, torch.Tensor]
                              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str],
                                         dict[str, torch.Tensor]]:
    """Official keys -> (model state, CLIP state, unused official key -> reason, fixed official key -> tensor).

    Optional units are returned in the model state; `load_official` moves them to `unused` when the
    configuration does not build them.
    """
    head: dict[str, torch.Tensor] = {}
    clip: dict[str, torch.Tensor] = {}
    unused: dict[str, str] = {}
    fixed: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        if key.startswith(CLIP_PREFIX):
            clip[key[len(CLIP_PREFIX):]] = tensor
            continue
        reason = next((why for prefix, why in release.unused.items() if key.startswith(prefix)), None)
        prefix = next((p for p in release.key_prefixes if key.startswith(p)), None)
        if reason is not None:
            unused[key] = reason
        elif key in release.fixed_ones:
            fixed[key] = tensor
        elif prefix is None:
            unknown.append(key)
        else:
            head[release.key_prefixes[prefix] + key[len(prefix):]] = tensor
    if unknown:
        raise MismatchError(f"keys that belong to no part of an official {release.name.upper()} checkpoint: "
                            f"{sorted(unknown)[:10]}{' ...' if len(unknown) > 10 else ''}; is this a checkpoint "
                            "of another model?")
    return head, clip, unused, fixed


def infer_config_values(release: OfficialRelease, head: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Widths from the projection and LayerNorm shapes."""
    required = ("image_cls_fc.weight", "image_tokens_fc.weight", "text_cls_layernorm.weight")
    missing = [key for key in required if key not in head]
    if missing:
        raise MismatchError(f"not an official {release.name.upper()} checkpoint: missing {missing} (official names: "
                            "encoder.image_cls_fc.*, encoder.image_tokens_fc.*, matcher.text_cls_layernorm.*)")
    hidden_dim, image_global_dim = head["image_cls_fc.weight"].shape
    _, image_patch_dim = head["image_tokens_fc.weight"].shape
    (text_dim,) = head["text_cls_layernorm.weight"].shape
    return {"text_dim": text_dim, "image_global_dim": image_global_dim, "image_patch_dim": image_patch_dim,
            "hidden_dim": hidden_dim}


def load_official(release_name: str, path: Path, options: Mapping[str, Any] | None = None
                  ) -> tuple[MelModel, ImportReport]:
    """An official checkpoint as an mmel model (strict: every key placed or reported, every shape checked).

    `options` overrides config values (e.g. {"bidirectional": True} for an M3EL WikiDiverse
    checkpoint, {"entity_text": "attr"}). By default the mmel-only options are off and the release
    quirks on, so the imported model scores exactly as the release does.
    """
    release = _release(release_name)
    state, unread_globals = read_checkpoint_tensors(path)
    head, clip, unused, fixed = split_official_state_dict(release, state)
    values = {**infer_config_values(release, head), **release.release_options, **(options or {})}
    model = release.model_class(release.model_class.config_class.from_dict(values))
    for prefix, attribute in release.optional_units.items():
        if getattr(model, attribute) is None:
            mmel_prefix = attribute + "."
            for key in [k for k in head if k.startswith(mmel_prefix)]:
                del head[key]
                unused[prefix + key[len(mmel_prefix):]] = (f"the {attribute} unit, not built by this configuration "
                                                           f"({_describe_options(values)})")
    _check_fixed_ones(fixed, model, path)
    model.load_weights(head, source=path)
    report = ImportReport(release=release.name, source=Path(path), config=model.config.to_dict(), loaded=len(head),
                          clip_tensors=len(clip), unused=unused,
                          fixed={key: release.fixed_ones[key] for key in fixed}, unread_globals=unread_globals)
    return model.eval(), report


def _describe_options(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={values[key]}" for key in ("bidirectional", "release_t2v_inference") if key in values)


def _check_fixed_ones(fixed: Mapping[str, torch.Tensor], model: MelModel, path: Path) -> None:
    """Built-in constants: all ones, one row per CSRA head of the configuration."""
    heads = len(getattr(model.config, "csra_temperatures", ()))
    for key, tensor in fixed.items():
        if tuple(tensor.shape) != (heads, 1) or not bool(torch.all(tensor == 1)):
            raise MismatchError(f"{path}: {key} is {tuple(tensor.shape)} with values {tensor.flatten().tolist()[:8]}, "
                                f"but mmel builds in ones of shape ({heads}, 1) (one per CSRA head); set "
                                "csra_temperatures to match the checkpoint's heads")


def import_official(release_name: str, path: Path, out_dir: Path, options: Mapping[str, Any] | None = None
                    ) -> ImportReport:
    """Import an official checkpoint and save it as an mmel checkpoint directory at `out_dir`."""
    model, report = load_official(release_name, path, options)
    card = (f"# {release_name} imported from an official checkpoint\n\n{report.summary()}\n\n"
            "The features must come from the same fine-tuned CLIP encoder (`encoder.clip.*` of the file).\n")
    provenance = {"release": report.release, "file": Path(path).name, "unused": sorted(report.unused),
                  "fixed": sorted(report.fixed)}
    model.save_pretrained(Path(out_dir), metadata={"imported_from": provenance}, card=card)
    report.out_dir = Path(out_dir)
    return report


def export_official_clip(path: Path, out_dir: Path, *, clip_dir: Path | None = None) -> Path:
    """Write the checkpoint's fine-tuned `encoder.clip.*` weights as a Hugging Face CLIP directory.

    Works for both releases (they share the encoder, models.md §2). The architecture comes from
    `clip_dir` (the user's local `openai/clip-vit-base-patch32` directory, whose tokenizer and
    image-processor files are copied too) or, without it, from transformers' default CLIPConfig,
    which is ViT-B/32; a tokenizer must then be added before the `clip` backbone can load it.
    """
    from transformers import CLIPConfig, CLIPModel

    state, _ = read_checkpoint_tensors(path)
    clip_state = {key[len(CLIP_PREFIX):]: tensor for key, tensor in state.items() if key.startswith(CLIP_PREFIX)}
    if not clip_state:
        raise MismatchError(f"{path}: holds no encoder.clip.* weights to export")
    config = CLIPConfig.from_pretrained(str(clip_dir), local_files_only=True) if clip_dir else CLIPConfig()
    clip = CLIPModel(config)
    clip_state = {k: v for k, v in clip_state.items() if k not in _CLIP_LEGACY_BUFFERS}
    _check_clip_keys(clip.state_dict(), clip_state, path)
    clip.load_state_dict(clip_state, strict=False)
    out_dir = Path(out_dir)
    clip.save_pretrained(str(out_dir), safe_serialization=True)
    if clip_dir is not None:
        for name in _CLIP_AUXILIARY_FILES:
            if (Path(clip_dir) / name).is_file():
                shutil.copy2(Path(clip_dir) / name, out_dir / name)
    return out_dir


def _check_clip_keys(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: Path) -> None:
    """Every CLIP parameter present with its shape; buffers that newer transformers recompute may be absent."""
    buffers_recomputed = set(_CLIP_LEGACY_BUFFERS)
    missing = sorted(set(own) - set(state) - buffers_recomputed)
    unexpected = sorted(set(state) - set(own))
    misshaped = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs CLIP {tuple(own[k].shape)}"
                       for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or misshaped:
        raise MismatchError(f"{source}: encoder.clip.* does not fit the CLIP architecture; "
                            f"missing: {missing or 'none'}; unexpected: {unexpected or 'none'}; "
                            f"shape mismatches: {misshaped or 'none'}")


__all__ = ["OFFICIAL_RELEASES", "ImportReport", "OfficialRelease", "UnreadObject", "export_official_clip",
           "import_official", "infer_config_values", "load_official", "read_checkpoint_tensors",
           "split_official_state_dict"]
