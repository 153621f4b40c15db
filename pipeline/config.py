"""AnoPLe config from YAML (every knob and ablation switch; see pipeline/model/config.py)."""
from __future__ import annotations

import yaml

from pipeline import storage
from pipeline.model.config import AnoPLeConfig


def load_config(uri: str | None = None, **overrides) -> AnoPLeConfig:
    """YAML file (local or s3://) -> AnoPLeConfig; keyword overrides (not None) win. Unknown keys fail."""
    data = {}
    if uri:
        data = yaml.safe_load(storage.read_bytes(uri).decode()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{uri}: an AnoPLe config is a mapping of knob: value")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return AnoPLeConfig.from_dict(data)
