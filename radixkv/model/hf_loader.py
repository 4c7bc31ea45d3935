"""Load a local Hugging Face model folder: config.json (+ generation_config.json) and safetensors
weights, single-file or sharded (model.safetensors.index.json). Nothing is downloaded."""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import torch

from radixkv.errors import ModelLoadError
from radixkv.model.config import ModelConfig, config_from_hf


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON object from a model file (config.json, an index); `ModelLoadError` if it cannot be
    read or is not an object. Shared by the loader and `radixkv.tools.calc`."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


class HFCheckpoint:
    """A Hugging Face folder: `config` plus `get(hf_name) -> torch.Tensor` read lazily from the
    safetensors shard that holds it."""

    def __init__(self, folder: str) -> None:
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise ModelLoadError(f"{folder} has no config.json")
        gen_path = os.path.join(folder, "generation_config.json")
        gen = read_json(gen_path) if os.path.isfile(gen_path) else None
        self.config: ModelConfig = config_from_hf(read_json(config_path), gen)
        self.folder = folder
        self._where = self._index_weights(folder)  # tensor name -> shard path
        self._handles: dict[str, Any] = {}

    @staticmethod
    def _index_weights(folder: str) -> dict[str, str]:
        from safetensors import safe_open

        index_path = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelLoadError(f"{index_path} has no weight_map")
            where = {name: os.path.join(folder, shard) for name, shard in weight_map.items()}
            missing = sorted({p for p in where.values() if not os.path.isfile(p)})
            if missing:
                raise ModelLoadError(f"{index_path} lists missing shards: {missing}")
            return where
        shards = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if not shards:
            other = [n for n in ("pytorch_model.bin", "model.pt") if
                     os.path.isfile(os.path.join(folder, n))]
            hint = f" (found {other[0]}: only safetensors weights are supported)" if other else ""
            raise ModelLoadError(f"{folder} has no *.safetensors weights{hint}")
        where = {}
        for shard in shards:
            try:
                with safe_open(shard, framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                        where[name] = shard
            except Exception as exc:
                raise ModelLoadError(f"cannot read {shard}: {exc}") from exc
        return where

    def get(self, hf_name: str) -> torch.Tensor:
        """The tensor `hf_name` as stored (any float dtype); ModelLoadError if absent."""
        from safetensors import safe_open

        shard = self._where.get(hf_name)
        if shard is None:
            raise ModelLoadError(f"{self.folder}: weights lack {hf_name!r}")
        handle = self._handles.get(shard)
        if handle is None:
            try:
                handle = self._handles[shard] = safe_open(shard, framework="pt")
            except Exception as exc:
                raise ModelLoadError(f"cannot read {shard}: {exc}") from exc
        return handle.get_tensor(hf_name)

    def close(self) -> None:
        """Drop the open shard handles."""
        self._handles.clear()
