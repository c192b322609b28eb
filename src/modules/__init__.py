"""One LightningModule per algorithm; ``check_positive`` is their shared one-line option check."""


def check_positive(name: str, value: float, *, zero_ok: bool = False) -> None:
    """A one-line ``ValueError`` naming the option unless ``value`` is > 0 (>= 0 with ``zero_ok``; NaN fails)."""
    if not (value >= 0 if zero_ok else value > 0):
        raise ValueError(f"{name} must be {'>= 0' if zero_ok else '> 0'}, got {value}")
