"""The one error type for checkpoints that cannot be trusted: every check names the file or tensor at fault."""


class CheckpointError(ValueError):
    """A checkpoint (or a compressed tensor set) is malformed, inconsistent or from an unknown format version."""
