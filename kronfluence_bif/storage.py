"""kronfluence-compatible files: paths, JSON arguments, score files; every write is atomic.

This is the only module that knows kronfluence's folder and file names.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kronfluence_bif.logs import logger

FACTOR_PREFIX = "factors_"
SCORE_PREFIX = "scores_"
ALL_MODULES = "all_modules"
BIF_ARGUMENTS_FILE = "bif_arguments.json"
BIF_TRACES_FILE = "bif_traces.safetensors"
BIF_DIAGNOSTICS_FILE = "bif_diagnostics.json"
# per-token runs: key `all_modules`, [n_query, T_query, n_train, T_train], influence of train token on query token
BIF_TOKEN_SCORES_FILE = "bif_token_scores.safetensors"
FACTOR_ARGUMENTS_FILE = "factor_arguments.json"
SCORE_ARGUMENTS_FILE = "score_arguments.json"
DATASET_METADATA_FILES = {"query": "query_dataset_metadata.json", "train": "train_dataset_metadata.json"}
BIF_HEADER_KEY = "bif_arguments"
CHECKPOINT_DIR = "bif_checkpoints"  # per-chain checkpoints, inside the scores folder while a run is unfinished

Partition = Optional[Tuple[int, int]]


class ScoreKind(str, Enum):
    """The two score kinds. A member equals (and formats as) its kronfluence name: `pairwise_scores.safetensors`."""

    PAIRWISE = "pairwise"
    SELF = "self"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def label(self) -> str:
        """'Pairwise' / 'Self', as in kronfluence's profiler phases."""
        return self.value.capitalize()


def factors_dir(analysis_dir: Path, factors_name: str) -> Path:
    return (analysis_dir / (FACTOR_PREFIX + factors_name)).resolve()


def scores_dir(analysis_dir: Path, scores_name: str) -> Path:
    return (analysis_dir / (SCORE_PREFIX + scores_name)).resolve()


def score_file(output_dir: Path, kind: str, partition: Partition = None) -> Path:
    """`pairwise_scores.safetensors` or kronfluence's partition name for `kind` in {pairwise, self}."""
    if partition is None:
        return output_dir / f"{kind}_scores.safetensors"
    data_partition, module_partition = partition
    return output_dir / f"{kind}_scores_data_partition{data_partition}_module_partition{module_partition}.safetensors"


# ---------------------------------------------------------------------------------------------- atomic writes
def _atomic_path(path: Path) -> Tuple[int, str]:
    """A temporary file next to `path` (hidden, `.tmp`: never mistaken for a result)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def _publish(tmp: str, path: Path) -> None:
    """Give the finished temporary file the permissions a plain `open` would (mkstemp and safetensors make 0600),
    then rename it over `path` in one step."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    fd, tmp = _atomic_path(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        _silent_unlink(tmp)
        raise


def save_json(obj: Any, path: Path) -> None:
    """kronfluence's JSON format (indent 4, ensure_ascii=False, no trailing newline), written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=4, ensure_ascii=False))


def load_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_tensors(
    path: Path, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None, durable: bool = True
) -> None:
    """safetensors file written under a temporary name and renamed, so a reader never sees half a file; `durable`
    also fsyncs it before the rename (results: they survive a power loss, not only a killed process)."""
    fd, tmp = _atomic_path(path)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        _silent_unlink(tmp)
        raise


def load_tensors(path: Path) -> Dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def load_metadata(path: Path) -> Dict[str, str]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return dict(f.metadata() or {})


def _silent_unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------- arguments
def save_or_check_json(
    path: Path, content: Any, what: str, overwrite_output_dir: bool, ignore: Sequence[str] = ()
) -> None:
    """kronfluence's skip/mismatch rule: equal content is kept, different content raises unless overwriting.

    Keys in `ignore` (settings that do not change the result) are not compared; when only they differ, the file
    is updated to the new values (so the next step uses them).
    """
    if path.exists() and not overwrite_output_dir:
        saved = load_json(path)

        def kept(d: Any) -> Any:
            return {k: v for k, v in d.items() if k not in ignore} if isinstance(d, dict) and ignore else d

        if kept(saved) != kept(content):
            raise ValueError(
                f"New {what} differ from the saved {what} at `{path}`. "
                "Set `overwrite_output_dir=True` to overwrite existing experiment.\n"
                f"New {what}: {content}\nSaved {what}: {saved}"
            )
        if saved != content:
            save_json(content, path)
            logger.info("Updated the run settings %s in `%s`.", list(ignore), path)
            return
        logger.debug("Found matching %s at `%s`.", what, path)
        return
    save_json(content, path)


def dataset_metadata(dataset: Any, indices: Optional[Sequence[int]]) -> Dict[str, Any]:
    return {
        "type": type(dataset).__name__,
        "dataset_size": len(dataset),
        "indices": None if indices is None else [int(i) for i in indices],
    }


def remove_stale_partitions(output_dir: Path, kind: str) -> List[Path]:
    """Remove partition files of a previous run (used with `overwrite_output_dir=True`)."""
    removed = []
    for path in output_dir.glob(f"{kind}_scores_data_partition*_module_partition*.safetensors"):
        path.unlink()
        removed.append(path)
    return removed


def remove_temporaries(folder: Path) -> List[Path]:
    """Remove the temporary files of writes that a killed process left behind (never readable as results)."""
    removed = []
    for path in folder.glob(".*.tmp"):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def jsonable(value: Any) -> Any:
    """NaN becomes None (and numpy scalars/arrays plain Python) so that `json.dumps` writes strict JSON."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


# ------------------------------------------------------------------------------------------ kronfluence's score files
def header_metadata(score_args: Any, bif_args: Any) -> Dict[str, str]:
    """A score file's header: kronfluence's 17 ScoreArguments keys, unchanged, plus one `bif_arguments` key (JSON)."""
    metadata = score_args.to_str_dict()
    metadata[BIF_HEADER_KEY] = json.dumps(bif_args.to_dict())
    return metadata


class ScoreWriter:
    """Writes one scores folder's files of one kind exactly as kronfluence does: the unpartitioned file, one file per
    (data, module) partition, and their aggregation; plus BIF's token-by-token file."""

    def __init__(self, output_dir: Path, kind: str, metadata: Dict[str, str], dtype: torch.dtype) -> None:
        self.output_dir = output_dir
        self.kind = ScoreKind(kind)
        self.metadata = metadata
        self.dtype = dtype

    def save(self, scores: Dict[str, torch.Tensor], partition: Partition = None) -> None:
        tensors = {k: v.contiguous().to(self.dtype) for k, v in scores.items()}
        save_tensors(score_file(self.output_dir, self.kind, partition), tensors, self.metadata)
        if partition is None:
            logger.info("Saved %s scores at `%s`.", self.kind, self.output_dir)
        else:
            logger.info(
                "Saved %s scores of data partition %d and module partition %d at `%s`.",
                self.kind,
                *partition,
                self.output_dir,
            )

    def save_token_scores(self, scores: torch.Tensor) -> None:
        tensors = {ALL_MODULES: scores.contiguous().to(self.dtype)}
        save_tensors(self.output_dir / BIF_TOKEN_SCORES_FILE, tensors, self.metadata)
        logger.info("Saved token-by-token scores %s at `%s`.", tuple(scores.shape), self.output_dir)

    def aggregate(
        self, data_partitions: int, module_partitions: int, add_data_partitions: bool
    ) -> Optional[Dict[str, torch.Tensor]]:
        """kronfluence's aggregation: add each key over module partitions, then concatenate data partitions along
        the train axis (or add them, for aggregated train gradients). None while a partition file is missing."""
        files = [
            [score_file(self.output_dir, self.kind, (p, j)) for j in range(module_partitions)]
            for p in range(data_partitions)
        ]
        if not all(f.exists() for row in files for f in row):
            return None
        merged: Dict[str, torch.Tensor] = {}
        for row in files:
            part: Dict[str, torch.Tensor] = {}
            for f in row:
                for key, value in load_tensors(f).items():
                    part[key] = part[key] + value if key in part else value
            for key, value in part.items():
                if key not in merged:
                    merged[key] = value
                elif add_data_partitions:
                    merged[key] = merged[key] + value
                else:
                    merged[key] = torch.cat((merged[key], value), dim=1 if self.kind == ScoreKind.PAIRWISE else 0)
        save_tensors(score_file(self.output_dir, self.kind), merged, self.metadata)
        logger.info("Saved aggregated %s scores at `%s`.", self.kind, self.output_dir)
        return merged
