"""The fake model and engine loop, now public in :mod:`servekit.testing.fake_model`."""

from servekit.testing.fake_model import (
    EOS,
    VOCAB,
    FakeModel,
    drain,
    next_token,
    reference_output,
    step,
)

__all__ = ["EOS", "VOCAB", "FakeModel", "drain", "next_token", "reference_output", "step"]
