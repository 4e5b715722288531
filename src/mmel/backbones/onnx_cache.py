"""ONNX files made from a backbone's own weights, cached on disk, and ONNX Runtime sessions over them.

Nothing is downloaded: each file is exported here from the loaded PyTorch network (`torch.onnx`)
and, for int8, quantized here by ONNX Runtime's dynamic quantizer. A file's name is the SHA-256 of
everything it is made from (the backbone's fingerprint, which network, the variant, and the
versions of the tools that wrote it), so a cached file is reused only when it would come out the
same, and a new version of torch, transformers or onnxruntime makes a new file beside the old.

Writes are atomic and serialised: one process exports while holding the cache's lock file, into a
temporary sibling that is renamed into place; a `kill -9` leaves at most that temporary, which the
next writer removes under the same lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from mmel.core.errors import UsageError
from mmel.core.paths import mmel_cache_dir, remove_stale_temporaries

logger = logging.getLogger(__name__)

ONNX_OPSET = 17
EXPORT_FORMAT = 1         # bump when the export code changes what it writes
LOCK_FILE = ".lock"


def default_onnx_cache_dir() -> Path:
    """`$MMEL_CACHE_DIR/onnx`, else `$XDG_CACHE_HOME/mmel/onnx` (`~/.cache/mmel/onnx`)."""
    return mmel_cache_dir() / "onnx"


def tool_versions() -> dict[str, str]:
    """Versions of the tools that shape an exported or quantized file (part of every cache key)."""
    return {name: importlib.metadata.version(name) for name in ("torch", "transformers", "onnx", "onnxruntime")}


def cache_file_name(identity: Mapping[str, object]) -> str:
    """`<stem>-<24 hex>.onnx`: the hex is the SHA-256 of the JSON of `identity` (which must hold a `stem`)."""
    digest = hashlib.sha256(json.dumps(dict(identity), sort_keys=True).encode("utf-8")).hexdigest()
    return f"{identity['stem']}-{digest[:24]}.onnx"


def cached_file(cache_dir: Path, identity: Mapping[str, object], write: Callable[[Path], None]) -> Path:
    """The cached file for `identity`, made by `write(path)` first if it is not there yet.

    `write` gets a temporary path in the cache directory to write to; only a complete file is
    renamed to its final name.
    """
    cache_dir = Path(cache_dir)
    path = cache_dir / cache_file_name(identity)
    if path.is_file():
        return path
    with _locked(cache_dir):
        if path.is_file():      # another process made it while this one waited for the lock
            return path
        removed = remove_stale_temporaries(cache_dir)
        if removed:
            logger.info("removed %d leftover(s) of interrupted exports in %s", len(removed), cache_dir)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            write(Path(tmp))
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)    # mkstemp makes 0600: readable by whoever may read the cache
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    logger.info("cached %s", path)
    return path


@contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / LOCK_FILE, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def export_onnx(module: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path, *,
                input_names: list[str], output_name: str, dynamic_axes: dict[str, dict[int, str]]) -> None:
    """Trace `module` on `example` inputs and write it as ONNX to `path` (TorchScript exporter, opset 17).

    The tracer's warnings (Python branches frozen into the graph) are silenced: the graphs are
    checked against the PyTorch network on load, at shapes other than the traced ones.
    """
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), example, str(path), input_names=input_names, output_names=[output_name],
                          dynamic_axes=dynamic_axes, opset_version=ONNX_OPSET, dynamo=False)


def quantize_int8(source: Path, target: Path) -> None:
    """ONNX Runtime dynamic quantization: MatMul/Gemm weights int8 per output channel, activations per call.

    Per-channel weights keep MiniLM's sentence vectors at cosine ~0.993 of float32 on WikiMEL
    mentions, against ~0.96 with one scale per tensor (bench/bench_query_encoding.py).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Gemm"])


class OrtSession:
    """An ONNX Runtime CPU session with `threads` intra-op threads (default: torch's current count)."""

    def __init__(self, path: Path, *, threads: int | None = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        self.path = Path(path)
        try:
            self._session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:   # onnxruntime raises its own untyped errors for unreadable models
            raise UsageError(f"{path}: ONNX Runtime cannot load this file ({error}); delete it to have it "
                             "exported again") from None
        self.input_names = [node.name for node in self._session.get_inputs()]

    def run(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The session's single output for CPU tensors `inputs` (by input name), as a torch tensor."""
        feeds = {name: np.ascontiguousarray(inputs[name].numpy()) for name in self.input_names}
        return torch.from_numpy(self._session.run(None, feeds)[0])


__all__ = ["EXPORT_FORMAT", "ONNX_OPSET", "OrtSession", "cache_file_name", "cached_file", "default_onnx_cache_dir",
           "export_onnx", "quantize_int8", "tool_versions"]
