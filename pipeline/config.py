"""AnoPLe config from YAML (every knob and ablation switch; see pipeline/model/config.py)."""
from __future__ import annotations

import yaml

from pipeline import storage
from pipeline.errors import UsageError
from pipeline.model.config import AnoPLeConfig


def load_config(uri: str | None = None, **overrides) -> AnoPLeConfig:
    """YAML file (local or s3://) -> AnoPLeConfig; keyword overrides (not None) win. Unknown keys fail."""
    data = {}
    if uri:
        try:
            data = yaml.safe_load(storage.read_bytes(uri).decode()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UsageError(f"bad config {uri}: {type(e).__name__}: {e}") from e
        if not isinstance(data, dict):
            raise UsageError(f"bad config {uri}: an AnoPLe config is a mapping of knob: value")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return AnoPLeConfig.from_dict(data)
    except (TypeError, ValueError) as e:  # the pure model package words its own checks as ValueError
        raise UsageError(f"bad config: {e}") from e
