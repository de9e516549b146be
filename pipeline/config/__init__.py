"""Configuration: the schema of `params.yaml` and its one strict loader.

    from pipeline.config import Config, load_config
    cfg = load_config(root, preset="ci", overrides=["seed=7"])

`schema` holds the dataclasses (every key, its doc and range), `loader` reads and checks
`params.yaml` with presets and `--set` overrides, `params_file` writes a preset and
overrides back into `params.yaml` for DVC. Standard library and pyyaml only.
"""

from pipeline.config.loader import (
    build_config,
    deep_merge,
    describe,
    find_root,
    list_presets,
    load_config,
    parse_override,
    preset_overrides,
    read_yaml,
    resolve_data,
    save_resolved,
)
from pipeline.config.schema import (
    PARAMS_FILE,
    PRESETS_DIR,
    Config,
    ConfigError,
    DecodingConfig,
    EvaluateConfig,
    FinetuneConfig,
    GateConfig,
    MimicConfig,
    ModelConfig,
    PathsConfig,
    PretrainConfig,
    RegisterConfig,
    SourceConfig,
    StoryWorldConfig,
    SweepConfig,
    SweepSize,
    SynthesizeConfig,
    TokenizerConfig,
    TrackingConfig,
    ValidateConfig,
    spec,
)

__all__ = [
    "PARAMS_FILE",
    "PRESETS_DIR",
    "Config",
    "ConfigError",
    "DecodingConfig",
    "EvaluateConfig",
    "FinetuneConfig",
    "GateConfig",
    "MimicConfig",
    "ModelConfig",
    "PathsConfig",
    "PretrainConfig",
    "RegisterConfig",
    "SourceConfig",
    "StoryWorldConfig",
    "SweepConfig",
    "SweepSize",
    "SynthesizeConfig",
    "TokenizerConfig",
    "TrackingConfig",
    "ValidateConfig",
    "build_config",
    "deep_merge",
    "describe",
    "find_root",
    "list_presets",
    "load_config",
    "parse_override",
    "preset_overrides",
    "read_yaml",
    "resolve_data",
    "save_resolved",
    "spec",
]
