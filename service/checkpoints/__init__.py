"""Checkpoints: the format (format.py: read, write, validate against a backbone, materialize),
publishing into the store (publish.py) and the store's errors in our one table (store_errors.py).

The format's public names are importable from here: `from service.checkpoints import load`.
"""

from service.checkpoints.format import (
    FORMAT,
    MAX_CHECKPOINT_BYTES,
    NAME_PATTERN,
    BackboneRef,
    Checkpoint,
    Manifest,
    check_backbone,
    check_classnames,
    check_templates,
    dump,
    load,
    materialize,
    new_manifest,
    parse,
    validate,
)

__all__ = [
    "FORMAT",
    "MAX_CHECKPOINT_BYTES",
    "NAME_PATTERN",
    "BackboneRef",
    "Checkpoint",
    "Manifest",
    "check_backbone",
    "check_classnames",
    "check_templates",
    "dump",
    "load",
    "materialize",
    "new_manifest",
    "parse",
    "validate",
]
