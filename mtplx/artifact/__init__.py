"""The artifact layer: what an artifact is, how it is built, fetched, cached and loaded.

contract.py   the runtime contract mtplx_runtime.json (parse, validate, write)
sidecar.py    the MTP sidecar: read it, check it (shapes, NaN/Inf, draft ids), build its head
graft.py      build an artifact from an original checkpoint (local or on the Hub)
probe.py      acceptance of a head on a probe text
vocab.py      choosing a reduced draft vocabulary
hub.py        Hugging Face repo ids: snapshots, and the MTP tensors alone by byte range
store.py      the local artifact cache: graft on first use, list, remove
paths.py      where that cache lives (MTPLX_CACHE) and how a ref names an artifact in it
loader.py     resolve a model ref and load trunk + head, refusing mismatched artifacts
legacy.py     artifacts published for another MLX MTP runtime
inspect.py    a compatibility verdict from a ref's small files
tensors.py    safetensors bookkeeping and hashes of stored bytes
progress.py   bars on a terminal, a line per phase elsewhere, or nothing
"""
