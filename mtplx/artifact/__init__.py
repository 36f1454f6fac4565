"""The artifact: runtime contract, sidecar graft and loader."""
