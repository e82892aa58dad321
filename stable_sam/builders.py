"""Building a ``StableSam``: the model registry, checkpoint resolution and device choice."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import Sam

from .checkpoint import load_plugin
from .download import OFFICIAL_CHECKPOINTS, CheckpointError, ensure_official_checkpoint, file_sha256
from .embedding_cache import EmbeddingCache
from .model import UNTRAINED_PLUGIN, StableSam
from .modeling.adapter import SamAdapter
from .modeling.plugin import StableSamPlugin
from .modeling.sam1_adapter import Sam1Adapter
from .modeling.sam2_adapter import SAM2_CONFIGS, Sam2Adapter, build_sam2_model
from .modeling.sam_tiny import build_sam_tiny
from .settings import SAM_TINY_CHECKPOINT, ModelSettings

log = logging.getLogger(__name__)

_SAM1_BUILDERS: Dict[str, Callable[..., Sam]] = {
    "sam_tiny": build_sam_tiny,
    "vit_b": sam_model_registry["vit_b"],
    "vit_l": sam_model_registry["vit_l"],
    "vit_h": sam_model_registry["vit_h"],
}
SAM2_TYPES = tuple(SAM2_CONFIGS)  # sam2.1_hiera_tiny | small | base_plus | large
MODEL_TYPES = tuple(_SAM1_BUILDERS) + SAM2_TYPES


def resolve_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when present, else CPU. An unavailable device is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"DEVICE={device} was asked for, but torch sees no CUDA device")
    return dev


def _build_sam1(model_type: str, checkpoint: Optional[Path]) -> Sam:
    if checkpoint is None:
        return _SAM1_BUILDERS[model_type]()
    if model_type == "sam_tiny":
        return build_sam_tiny(checkpoint)
    # segment_anything's builders torch.load() without map_location: load on CPU ourselves.
    sam = _SAM1_BUILDERS[model_type]()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    try:
        sam.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint} is not a SAM {model_type} checkpoint: {str(e)[:300]}") from e
    return sam


def _build_sam2(model_type: str, checkpoint: Optional[Path]):
    try:
        return build_sam2_model(model_type, checkpoint)
    except Exception as e:  # the loader raises KeyError, RuntimeError or unpickling errors
        if checkpoint is None:
            raise
        raise CheckpointError(f"{checkpoint} is not a SAM 2.1 {model_type} checkpoint (the official layout "
                              f"{{'model': state_dict}} of that model): {e.__class__.__name__}: {str(e)[:300]}") from e


# One entry per model type: its family's builder and adapter.
_ADAPTERS: Dict[str, Callable[[str, Optional[Path]], SamAdapter]] = {
    **{t: lambda t_, c: Sam1Adapter(_build_sam1(t_, c)) for t in _SAM1_BUILDERS},
    **{t: lambda t_, c: Sam2Adapter(_build_sam2(t_, c)) for t in SAM2_TYPES},
}


def build_sam(model_type: str, checkpoint: Optional[Path]) -> SamAdapter:
    """A bare SAM of ``model_type`` (on CPU) behind its family's adapter; random weights when
    ``checkpoint`` is None (benchmarks and tests only)."""
    if model_type not in _ADAPTERS:
        raise ValueError(f"unknown SAM model type {model_type!r}; expected one of {MODEL_TYPES}")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise CheckpointError(f"SAM checkpoint not found: {checkpoint}")
    return _ADAPTERS[model_type](model_type, checkpoint)


def resolve_sam_checkpoint(model_type: str, sam_checkpoint: Optional[Union[str, Path]],
                           model_dir: Path, download: bool = True) -> Path:
    """The SAM weights file to load: ``sam_checkpoint`` when given, the committed small SAM's for
    "sam_tiny", else the official file in ``model_dir`` (downloaded when missing and ``download``)."""
    if sam_checkpoint is not None:
        path = Path(sam_checkpoint)
        if not path.is_file():
            hint = f" (the official one: {OFFICIAL_CHECKPOINTS[model_type].url})" if model_type in OFFICIAL_CHECKPOINTS else ""
            raise CheckpointError(f"SAM checkpoint not found: {path}{hint}")
        return path
    if model_type == "sam_tiny":
        if not SAM_TINY_CHECKPOINT.is_file():
            raise CheckpointError(f"the small SAM checkpoint {SAM_TINY_CHECKPOINT} is missing; it ships with "
                                  f"the repository, or retrain it with training/train_small_sam.py")
        return SAM_TINY_CHECKPOINT
    if model_type not in OFFICIAL_CHECKPOINTS:
        raise ValueError(f"unknown SAM model type {model_type!r}; expected one of {MODEL_TYPES}")
    return ensure_official_checkpoint(model_type, model_dir, download=download)


def model_identity(model_type: str, checkpoint: Path) -> str:
    """``<type>-<sha256 prefix>``: the cache key prefix and the base of ``model_version``. An
    official file (same name and size) is not re-hashed: 2.5 GB take seconds. SAM 2.1's official
    files have no published size or checksum: the name alone marks one (``<type>-<release>``), so
    give weights of your own another file name."""
    official = OFFICIAL_CHECKPOINTS.get(model_type)
    if (official and checkpoint.name == official.filename
            and (official.size is None or checkpoint.stat().st_size == official.size)):
        return f"{model_type}-{official.identity}"
    return f"{model_type}-{file_sha256(checkpoint)[:12]}"


def build(model_type: str = "sam_tiny", sam_checkpoint: Optional[Union[str, Path]] = None,
          plugin_checkpoint: Optional[Union[str, Path]] = None, device: Optional[Union[str, torch.device]] = None,
          model_dir: Optional[Path] = None, cache: Optional[EmbeddingCache] = None,
          download: bool = True) -> StableSam:
    """Load SAM (frozen) and the plugin.

    Args:
        model_type: one of ``MODEL_TYPES``: "sam_tiny" (the committed small SAM), "vit_b" / "vit_l" /
            "vit_h", or a SAM 2.1 size ("sam2.1_hiera_tiny", ...).
        sam_checkpoint: SAM's weights (default: the committed small SAM, or the official file in
            ``model_dir``, downloaded unless ``download`` is False).
        plugin_checkpoint: a plugin file (``save_plugin``); None: the untrained plugin, an exact
            no-op, so the model serves plain SAM's masks.
        device: "auto" / None (CUDA when present), "cpu", "cuda", "cuda:N".
        model_dir: where official weights are kept (default: MODEL_DIR).
        cache: the embedding cache (default: 512 MB in memory).
        download: fetch a missing official checkpoint.

    Returns:
        A ``StableSam`` ready to serve (``StableSamPredictor(model)``).

    Raises:
        CheckpointError: a checkpoint is missing, unreadable or for another model type.
        ValueError: an unknown model type.
    """
    model_dir = Path(model_dir) if model_dir is not None else ModelSettings().model_dir
    dev = resolve_device(device)
    ckpt = resolve_sam_checkpoint(model_type, sam_checkpoint, model_dir, download)
    adapter = build_sam(model_type, ckpt)
    model_id = model_identity(model_type, ckpt)
    if plugin_checkpoint is not None:
        loaded = load_plugin(plugin_checkpoint, model_type=model_type)
        plugin, version = loaded.plugin, loaded.version
    else:
        plugin, version = StableSamPlugin(), UNTRAINED_PLUGIN
    log.info("serving SAM %s from %s with plugin %s on %s", model_type, ckpt, version, dev)
    return StableSam(adapter, plugin, model_type, model_id, dev, version, cache)


def build_from_settings(settings: Optional[ModelSettings] = None, **overrides) -> StableSam:
    """``build`` as the environment configures it (SAM_MODEL_TYPE, SAM_CHECKPOINT, PLUGIN_CHECKPOINT,
    DEVICE, MODEL_DIR, the embedding cache's size and disk store): what the backend serves.
    ``overrides``: ``build``'s keyword arguments to set instead."""
    s = settings or ModelSettings.from_env()
    cache = EmbeddingCache(s.embedding_cache_mb, s.model_dir / "embeddings" if s.embedding_disk_cache else None)
    kwargs = dict(model_type=s.sam_model_type, sam_checkpoint=s.sam_checkpoint,
                  plugin_checkpoint=s.plugin_path, device=s.device, model_dir=s.model_dir, cache=cache)
    kwargs.update(overrides)
    return build(**kwargs)
