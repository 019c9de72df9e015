"""One checkpoint file format for every network of wsseg (classifier, U-Net, MIP CNN, BoxFCN).

A checkpoint is a dict {format, version, state_dict, config, meta, ...} written with `torch.save`
to a temp name and renamed, and read with `torch.load(weights_only=True)`: plain tensors and JSON-able
values only, so loading a file can never run code. `format` names the network class, `config` holds
what rebuilds it, `meta` anything JSON-able (epoch metrics, tuned values).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from wsseg_core.storage import atomic_path

__all__ = ["save_checkpoint", "load_checkpoint"]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, fmt: str, version: int,
                    config: Mapping[str, Any], meta: Mapping[str, Any] | None = None,
                    **extra: Any) -> None:
    """Write `model`'s weights (on CPU; a DDP wrapper's `.module`), `config`, `meta` and `extra`
    entries atomically (temp name in the same folder, then `os.replace`).

    Raises:
        ValueError: `meta` is not JSON-able (it would not load with `weights_only=True`).
    """
    bare = getattr(model, "module", model)
    try:
        meta_clean = json.loads(json.dumps(dict(meta or {})))
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta must be JSON-able: {e}") from e
    payload = {"format": fmt, "version": int(version),
               "state_dict": {k: v.detach().cpu().clone() for k, v in bare.state_dict().items()},
               "config": dict(config), "meta": meta_clean, **extra}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike, *, fmt: str, version: int, what: str,
                    build: Callable[[dict], nn.Module]) -> tuple[nn.Module, dict]:
    """Read a `save_checkpoint` file of format `fmt`, rebuild the network with `build(config)` and
    load its weights; returns (model in eval mode on CPU, the whole checkpoint dict).

    Raises:
        ValueError naming `path` and `what` (e.g. "U-Net"): missing, unreadable, of another format
        or a newer version, or weights that do not match the saved config.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: {what} checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise ValueError(f"{path}: not a readable {what} checkpoint "
                         f"({type(e).__name__}: {_one_line(e)})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        raise ValueError(f"{path}: not a wsseg {what} checkpoint (no format {fmt!r})")
    if int(ckpt.get("version", -1)) > version:
        raise ValueError(f"{path}: checkpoint version {ckpt.get('version')} is newer than this "
                         f"code ({version})")
    model = build(dict(ckpt["config"]))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the saved config ({_one_line(e)})") from e
    model.eval()
    return model, ckpt
