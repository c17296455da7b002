"""What a checkpoint's readers verify: a SHA-256 of every saved array and of the metadata JSON.

Orbax and TensorStore check no array data: one flipped byte in a saved array file restores
without a word (in a test, 79 of 576 kernel values became garbage, up to 4.5e17). So every
save records, in its metadata, a digest of each array's dtype, shape and bytes (computed on the
host from the values being saved), and the metadata carries a digest of itself; a reader
recomputes them from what it restored and refuses any difference (`verify_arrays`,
`verify_metadata`). Arrays are named by their tree path with containers reduced to their keys,
so a restore into a train state and one into plain dicts (analysis) name them alike.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import jax
import numpy as np

CHECKSUMS = "checksums"  # metadata key: {item: {array path: digest}}
METADATA_DIGEST = "metadata_sha256"  # metadata key: digest of the rest of the metadata


class IntegrityError(ValueError):
    """What was read differs from what was saved (bit-rot, a partial copy), or is not finite."""


def _name(entry: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def _host(leaf: Any) -> np.ndarray:
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)  # what a typed PRNG key holds
    return np.asarray(jax.device_get(leaf))


def host_arrays(tree: Any) -> dict[str, np.ndarray]:
    """Every array leaf of `tree` as a NumPy array on this host, by "/"-joined path."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_name(e) for e in path): _host(leaf) for path, leaf in leaves}


def digest(array: np.ndarray) -> str:
    h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:32]


def nonfinite_arrays(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """The paths of floating-point arrays holding a NaN or an Inf."""
    return [path for path, a in arrays.items()
            if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all()]


def checksums(tree: Any) -> dict[str, str]:
    """{path: digest} of every array of `tree`; raises IntegrityError if one is not finite
    (no checkpoint may hold a NaN or an Inf)."""
    arrays = host_arrays(tree)
    bad = nonfinite_arrays(arrays)
    if bad:
        raise IntegrityError(f"non-finite values in {', '.join(bad[:5])}"
                             + (f" and {len(bad) - 5} more arrays" if len(bad) > 5 else ""))
    return {path: digest(a) for path, a in arrays.items()}


def seal(metadata: Mapping[str, Any], sums: Mapping[str, Mapping[str, str]]) -> dict:
    """`metadata` with the items' checksums and its own digest."""
    sealed = {**metadata, CHECKSUMS: dict(sums)}
    sealed.pop(METADATA_DIGEST, None)
    return {**sealed, METADATA_DIGEST: _metadata_digest(sealed)}


def _metadata_digest(metadata: Mapping[str, Any]) -> str:
    text = json.dumps({k: v for k, v in metadata.items() if k != METADATA_DIGEST},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def unsealed(metadata: Mapping[str, Any]) -> dict:
    """`metadata` as the caller of `seal` gave it."""
    return {k: v for k, v in metadata.items() if k not in (CHECKSUMS, METADATA_DIGEST)}


def is_sealed(metadata: Mapping[str, Any]) -> bool:
    """False for checkpoints written before checksums were recorded."""
    return METADATA_DIGEST in metadata


def verify_metadata(metadata: Mapping[str, Any]) -> None:
    """Raises IntegrityError if sealed metadata differs from what was written."""
    if is_sealed(metadata) and metadata[METADATA_DIGEST] != _metadata_digest(metadata):
        raise IntegrityError("its metadata does not match its checksum")


def verify_arrays(tree: Any, metadata: Mapping[str, Any], item: str) -> None:
    """Raises IntegrityError if an array of `tree` (the restored `item`) is not finite, or
    differs from what sealed `metadata` recorded for it (unsealed metadata: finiteness only)."""
    arrays = host_arrays(tree)
    bad = nonfinite_arrays(arrays)
    if bad:
        raise IntegrityError(f"{item} holds non-finite values in {', '.join(bad[:5])}")
    if not is_sealed(metadata):
        return
    expected = metadata.get(CHECKSUMS, {}).get(item)
    if expected is None:
        raise IntegrityError(f"its metadata records no checksums of {item}")
    got = {path: digest(a) for path, a in arrays.items()}
    differ = sorted(p for p in set(got) | set(expected) if got.get(p) != expected.get(p))
    if differ:
        raise IntegrityError(f"{len(differ)} array(s) of {item} differ from what was saved "
                             f"({', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''})")
