"""The errors q3lab raises on purpose. Anything else escaping q3lab is a bug."""
from __future__ import annotations


class Q3LabError(Exception):
    """Base of every anticipated q3lab failure; the CLI turns it into a message and exit status 2."""


class CheckpointError(Q3LabError):
    """A checkpoint folder is missing, incomplete, corrupt or not what its config says."""


class StoreError(Q3LabError):
    """An extracted store is incomplete, corrupt, or belongs to another model."""


class InputError(Q3LabError):
    """Bad input to the model or CLI: token ids, lengths, capacities, options."""
