"""Typed errors raised by radixkv.

Every error is raised before any state changes, so a caller that catches one can keep using the
object that raised it.
"""

from __future__ import annotations


class RadixKVError(Exception):
    """Base class of every error radixkv raises on purpose."""


class OutOfSlotsError(RadixKVError):
    """A pool has fewer free entries (KV slots or request rows) than were asked for."""


class InvalidSlotError(RadixKVError, ValueError):
    """A slot or row index is reserved (slot 0), out of range, or already free (a double free)."""


class LockError(RadixKVError):
    """A tree node was unlocked more often than it was locked."""


class InvariantError(RadixKVError, AssertionError):
    """`check_invariants()` found the radix tree or its pools in an inconsistent state."""


class InvalidRequestError(RadixKVError, ValueError):
    """A request or its sampling parameters are malformed; nothing was allocated."""


class AttentionInputError(RadixKVError, ValueError):
    """Attention inputs have inconsistent shapes, dtypes or devices (e.g. Hq not a multiple of
    Hkv, q and the K/V buffers of different dtypes, a 2-D q)."""


class ModelLoadError(RadixKVError):
    """A model file or folder is missing, unsupported or inconsistent."""


class ConfigError(RadixKVError, ValueError):
    """A configuration is invalid: an engine or `LLM` option (unknown policy or dtype, a
    non-positive size), or a tool's input (unknown preset, unreadable model config, malformed
    trace)."""


class EngineError(RadixKVError):
    """The engine failed while running a request (e.g. the model forward raised); the request
    was stopped and its memory released. `__cause__` holds the original exception."""
