"""Typed run configuration: presets, user YAML and ``--set`` overrides, validated up front.

The package has three rooms, each readable alone, and imports point down through them:

- :mod:`~generalist.config.schema`: the dataclasses (every key, its type, default and meaning)
  and the values and bounds the keys accept; it imports no other room.
- :mod:`~generalist.config.validation`: every check a config must pass, each error naming the
  dotted key; it reads the schema (and types task parameters with the coercer).
- :mod:`~generalist.config.building`: layering a dataset profile, a method preset, a user YAML
  and ``--set`` overrides into one ``Config``, which it then validates.

:mod:`~generalist.config.coercion`, the generic reader of plain data into the schema's
dataclasses, sits between the schema and the two rooms that use it. The names below are the
package's public interface; code inside the library imports from the room it needs.
"""

from generalist.config.building import (
    MAX_CONFIG_BYTES,
    MAX_OVERRIDE_CHARS,
    TASK_KEYS,
    apply_override,
    build_config,
    canonical_tasks,
    deep_merge,
    merge_layer,
    nest_task_params,
    read_config_file,
    set_key,
)
from generalist.config.coercion import from_dict
from generalist.config.schema import (
    BAD_FILE_POLICIES,
    INIT_POLICIES,
    INT_LIMITS,
    MAX_EPOCHS,
    MAX_IMAGE_SIZE,
    MAX_NAME_BYTES,
    MAX_SEED,
    MAX_WORKERS,
    MIN_VALIDATION_IMAGES,
    NONFINITE_POLICIES,
    OPTIMIZERS,
    REDISTRIBUTE_POLICIES,
    SELECTION_CRITERIA,
    STORAGES,
    UNLABELED_REST,
    BudgetConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    LearnerConfig,
    LoggingConfig,
    MergeConfig,
    ModelConfig,
    OptimizerConfig,
    PseudoLabelConfig,
    RedistributeConfig,
    TaskConfig,
)
from generalist.config.validation import (
    redistribute_rule,
    resolve_task,
    validate,
    validate_gammas,
    validate_name,
)

__all__ = [
    "BAD_FILE_POLICIES",
    "INIT_POLICIES",
    "INT_LIMITS",
    "MAX_CONFIG_BYTES",
    "MAX_EPOCHS",
    "MAX_IMAGE_SIZE",
    "MAX_NAME_BYTES",
    "MAX_OVERRIDE_CHARS",
    "MAX_SEED",
    "MAX_WORKERS",
    "MIN_VALIDATION_IMAGES",
    "NONFINITE_POLICIES",
    "OPTIMIZERS",
    "REDISTRIBUTE_POLICIES",
    "SELECTION_CRITERIA",
    "STORAGES",
    "TASK_KEYS",
    "UNLABELED_REST",
    "BudgetConfig",
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "LearnerConfig",
    "LoggingConfig",
    "MergeConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PseudoLabelConfig",
    "RedistributeConfig",
    "TaskConfig",
    "apply_override",
    "build_config",
    "canonical_tasks",
    "deep_merge",
    "from_dict",
    "merge_layer",
    "nest_task_params",
    "read_config_file",
    "redistribute_rule",
    "resolve_task",
    "set_key",
    "validate",
    "validate_gammas",
    "validate_name",
]
