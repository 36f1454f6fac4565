"""The basics every layer may import: decoding knobs and their limits, the user's config, the
device, the clock. Nothing here imports the rest of mtplx (only ``mtplx.errors``)."""
