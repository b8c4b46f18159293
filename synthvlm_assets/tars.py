"""WebDataset tars, written and read with the `webdataset` package: the one place tars are made or parsed.

A sample is a key and its members by extension; each member is the tar entry `<key>.<ext>` (keys hold no
dots: webdataset splits a name at its first dot). Writing is deterministic: the same samples give the same
bytes (fixed mtime, owner and mode), so a rerun publishes an identical tar and keeps its data version.
Reading streams: one sample in memory at a time, whatever the size of the tar.

`webdataset` is imported where it is used: it is in the `gpu` extra, not in the code location's image, and
importing it imports torch (a caption run stays free of it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import BinaryIO

# Entry metadata that does not depend on when or by whom a tar is written.
_FIXED = {"mtime": 0, "user": "", "group": "", "mode": 0o644}


def write_samples(fileobj: BinaryIO, samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> None:
    """Write `(key, {ext: bytes})` samples to an open binary file, members in the order given."""
    from webdataset import TarWriter

    with TarWriter(fileobj, encoder=False, **_FIXED) as sink:
        for key, members in samples:
            for ext, data in members.items():
                # One member a write: TarWriter sorts a sample's members by extension, and the order
                # given is the order of the tars published before this module (same bytes, same versions).
                sink.write({"__key__": key, ext: data})


def read_samples(fileobj: BinaryIO) -> Iterator[tuple[str, dict[str, bytes]]]:
    """`(key, {ext: bytes})` of each sample of a tar, streamed from an open binary file; the members of
    one sample must be adjacent (as `write_samples` writes them)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    source = {"url": getattr(fileobj, "name", None), "stream": fileobj}
    for sample in group_by_keys(tar_file_expander([source])):
        key = sample.pop("__key__")
        yield key, {ext: data for ext, data in sample.items() if not ext.startswith("__")}
