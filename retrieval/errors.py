"""Typed exceptions: library code raises these, only the CLI and the page turn them into messages."""

from __future__ import annotations


class CrossmodalError(Exception):
    """Base of every error crossmodal raises on purpose."""


class UserError(CrossmodalError):
    """Something the user can fix (bad input, missing weights, wrong index); CLI exit code 2."""


class InputNotFound(UserError):
    """A path given on the command line does not exist or cannot be read."""


class DecodeError(UserError):
    """Bytes that are not a decodable image (corrupt, truncated, unsupported, too large)."""


class ModelUnavailable(UserError):
    """Model weights cannot be loaded: not cached and the hub unreachable, or a bad checkpoint file."""


class ModelConfigError(UserError):
    """A --model FILE.json that is not a usable open_clip model config (unreadable, not JSON, malformed, or one
    whose tokenizer or text tower open_clip would download at run time)."""


class ModelMismatch(UserError):
    """The index was built with another model than the one requested."""


class IndexMissing(UserError):
    """No index exists in the chosen home yet."""


class EmptyIndex(UserError):
    """The index holds nothing of the modality a query needs."""


class IndexMismatch(UserError):
    """Catalog and vector files disagree; the message says how to repair."""


class IndexLocked(UserError):
    """Another process is writing to the same index."""


class CorpusError(UserError):
    """A caption corpus file cannot be parsed as asked (missing column, bad JSON line, ...)."""


class SchemaTooNew(UserError):
    """The catalog was written by a newer crossmodal than this one."""


class TokensUnsupported(UserError):
    """The model has no token features the reranker can use (not an open_clip ViT CLIP)."""


class ExportUnsupported(CrossmodalError):
    """The model's towers or tokenizer are not of a kind the ONNX exporter handles (queries stay on torch)."""


class DiskFull(UserError):
    """A write failed for lack of space (ENOSPC, a quota, a short write); the message names the path and what
    was kept."""


class ExportDamaged(CrossmodalError):
    """An ONNX export's files cannot be loaded (truncated or corrupt): queries fall back to torch, it is made again."""


class ReadOnlyHome(UserError):
    """The index home cannot be written (permissions, a read-only mount): queries work, writers say so."""


class ExportBusy(CrossmodalError):
    """Another process is writing the same model's ONNX export (and the wait for it ran out, or there was none)."""


class Int8Refused(CrossmodalError):
    """The int8 image tower cannot be used (its check against fp32 failed, or it cannot be made): the index run
    embeds images at the default precision instead, after one line."""
