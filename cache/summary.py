"""Human summary of a store (``pipeline info``); works on incomplete stores too."""
from __future__ import annotations

from collections import Counter
from typing import Any

from .reader import FeatureStore
from .schema import compression_of


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""


def describe(url: str) -> dict[str, Any]:
    s = FeatureStore(url, require_complete=False)
    a = s.attrs
    classes = s.classes
    counts = Counter(int(x) for x in s.labels)
    per_class = {(classes[k] if 0 <= k < len(classes) else "unlabelled"): v for k, v in sorted(counts.items())}
    size = s.nbytes_on_disk()
    return {
        "store": url,
        "complete": a.get("complete") is True,
        "samples": s.n,
        "done": int(s.done.sum()),
        "failed": int(s.failed.sum()),
        "splits": dict(Counter(str(x) or "(none)" for x in s.splits)),
        "classes": per_class,
        "mask_classes": s.mask_classes,
        "volumes": len({g for g in s.groups if g}),
        "encoder": a.get("encoder"),
        "checkpoint_sha256": a.get("checkpoint_sha256"),
        "precision": a.get("precision"),
        "dtype": s.dtype,
        "shard_size": s.shard_size,
        "compression": compression_of(a),
        "preprocessing": a.get("preprocessing"),
        "dataset_kind": a.get("dataset_kind"),
        "dataset_root": a.get("dataset_root"),
        "created": a.get("created"),
        "completed": a.get("completed"),
        "bytes_on_disk": size,
        "bytes_per_sample": None if size is None else size / max(int(s.done.sum()), 1),
        "files": s.file_count(),
        "versions": a.get("versions", {}),
    }


def format_summary(d: dict[str, Any]) -> str:
    state = "complete" if d["complete"] else f"INCOMPLETE ({d['done']}/{d['samples']} done; re-run extract)"
    lines = [
        f"store        {d['store']}",
        f"status       {state}",
        f"samples      {d['samples']}" + (f" ({d['failed']} failed)" if d["failed"] else ""),
        "splits       " + ", ".join(f"{k} {v}" for k, v in d["splits"].items()),
        "classes      " + (", ".join(f"{k} {v}" for k, v in d["classes"].items()) or "-"),
    ]
    if d["mask_classes"]:
        lines.append(f"mask classes {', '.join(d['mask_classes'])}")
    if d["volumes"]:
        lines.append(f"volumes      {d['volumes']}")
    lines += [
        f"encoder      {d['encoder']} (checkpoint sha256 {str(d['checkpoint_sha256'])[:16]}..., {d['precision']})",
        f"dataset      {d['dataset_kind']} at {d['dataset_root']}",
        f"storage      {d['dtype']}, {d['shard_size']} samples/shard, compression {d['compression']}",
    ]
    if d["bytes_on_disk"] is not None:
        lines.append(f"size         {_size(d['bytes_on_disk'])} in {d['files']} files, "
                     f"{_size(d['bytes_per_sample'])} per sample")
    lines.append(f"created      {d['created']}" + (f", completed {d['completed']}" if d["completed"] else ""))
    return "\n".join(lines)


__all__ = ["describe", "format_summary"]
