"""Per-chain checkpoints of a sampling phase, so a killed run resumes where it stopped.

A checkpoint holds one chain's moments so far, its sampler, minibatch stream and weights, and its traces,
written atomically at a block boundary (so a resumed chain sums its draws in exactly the uninterrupted
order). Files are per chain, not per process: a run killed with 2 processes resumes with 1 or 4. A
fingerprint of everything that shapes the result guards against loading a checkpoint of another computation.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from kronfluence_bif import storage
from kronfluence_bif.logs import logger

CHECKPOINT_DIR = storage.CHECKPOINT_DIR  # kept here too: tests and users import it from this module
FORMAT_VERSION = 1


def fingerprint(content: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


class CheckpointStore:
    """Checkpoint files of one computation (a scores folder, a kind, a set of data partitions)."""

    def __init__(self, scores_dir: Path, tag: str, fingerprint: str, shard: int = 0, num_shards: int = 1) -> None:
        self.folder = scores_dir / CHECKPOINT_DIR
        self.tag = tag
        self.fingerprint = fingerprint
        self.suffix = "" if num_shards == 1 else f"_shard{shard}of{num_shards}"

    def path(self, chain: int) -> Path:
        return self.folder / f"{self.tag}_chain{chain}{self.suffix}.safetensors"

    def save(self, chain: int, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
        header = {"fingerprint": self.fingerprint, "format": str(FORMAT_VERSION), "meta": json.dumps(meta)}
        # no fsync: the rename already keeps a killed run's checkpoints whole, and one a power loss leaves
        # unreadable only restarts its chain (`load`); the final scores are written durably
        storage.save_tensors(self.path(chain), tensors, header, durable=False)
        logger.debug("Checkpoint of chain %d at draw %s: `%s`.", chain, meta.get("draws_done"), self.path(chain))

    def load(self, chain: int) -> Optional[Tuple[Dict[str, torch.Tensor], Dict[str, Any]]]:
        """The chain's checkpoint, or None when there is none (or it belongs to another computation)."""
        path = self.path(chain)
        if not path.exists():
            return None
        try:
            header = storage.load_metadata(path)
            if header.get("fingerprint") != self.fingerprint or header.get("format") != str(FORMAT_VERSION):
                logger.warning("Ignoring checkpoint `%s`: it was written by a different computation.", path)
                return None
            return storage.load_tensors(path), json.loads(header["meta"])
        except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint only costs a restart of that chain
            logger.warning("Ignoring unreadable checkpoint `%s` (%s); the chain starts over.", path, exc)
            return None


def remove_checkpoints(scores_dir: Path, tag: Optional[str] = None) -> int:
    """Delete the checkpoints of `tag` (all of them when None); the folder goes when it is empty."""
    folder = scores_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return 0
    pattern = "*.safetensors" if tag is None else f"{tag}_*chain*.safetensors"  # also its column blocks
    removed = 0
    for path in folder.glob(pattern):
        path.unlink(missing_ok=True)
        removed += 1
    storage.remove_temporaries(folder)
    try:
        folder.rmdir()
    except OSError:
        pass
    return removed
