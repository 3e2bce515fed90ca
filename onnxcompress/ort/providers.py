"""An execution provider the user asked for by name must be there: a one-line error (exit 2) otherwise, unless
they allow it to be missing (`--allow-unavailable-providers`; recipe `allow_unavailable_providers = true`).
Then `validate` and `bench` list it as skipped with the reason, and `optimize` prepares the model for it
(INT8 format, rank alignment) with a warning that nothing ran on it here."""
from __future__ import annotations

from typing import Sequence

from ..errors import UserError

ALLOW_FLAG = "--allow-unavailable-providers"


def unavailable(providers: Sequence[str]) -> list[tuple[str, str]]:
    """(provider, why) for each of `providers` that cannot run here."""
    from .session import provider_status

    out = []
    for p in providers:
        why = provider_status(p)
        if why:
            out.append((p, why))
    return out


def require_available(providers: Sequence[str], allow: bool = False, command: str = "") -> list[str]:
    """Raise a one-line UserError naming the first unavailable provider, or — with `allow` — return one
    warning per unavailable provider."""
    missing = unavailable(providers)
    if missing and not allow:
        p, why = missing[0]
        raise UserError(f"--providers {p}: {why}; {ALLOW_FLAG} to go on without it")
    if command == "optimize":
        return [f"provider {p} is not available here ({why}): the model is prepared for it, but nothing ran "
                f"on it" for p, why in missing]
    return [f"provider {p} skipped: {why}" for p, why in missing]


def require_ran(skipped: Sequence[tuple[str, str]], allow: bool = False) -> None:
    """After validate/bench: a provider that was requested but could not run (e.g. its session fell back to
    the CPU) is an error unless allowed. `skipped`: (provider, why)."""
    if skipped and not allow:
        p, why = skipped[0]
        raise UserError(f"--providers {p}: {why}; {ALLOW_FLAG} to go on without it")
