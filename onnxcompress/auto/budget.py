"""The accuracy budget of an auto search and the floors every result is held to.

Kinds, in order of preference: `accuracy` (labelled data: at most `--max-accuracy-drop` points lost, default
1.0), `agreement` (a classifier's outputs: top-1 agreement with the original at least `--min-top1-agreement`,
default 0.99), `sqnr` (any other output: at least `--min-sqnr` dB, default 30)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..ort.fidelity import Fidelity

DEFAULTS = {"accuracy": 1.0, "agreement": 0.99, "sqnr": 30.0}
#: explicit recipes are warned (and --strict fails) below these
FLOOR_AGREEMENT = 0.9
FLOOR_SQNR_DB = 10.0


@dataclass
class Budget:
    kind: str            # accuracy | agreement | sqnr
    limit: float         # points | fraction | dB

    def measured(self, fid: Fidelity) -> float | None:
        """The fidelity in the budget's unit (accuracy: points lost)."""
        if self.kind == "accuracy":
            return None if fid.accuracy_drop is None else 100.0 * fid.accuracy_drop
        if self.kind == "agreement":
            return fid.top1_agreement
        return fid.sqnr_db

    def met(self, fid: Fidelity) -> bool:
        v = self.measured(fid)
        if v is None:
            return False
        return v <= self.limit + 1e-12 if self.kind == "accuracy" else v >= self.limit - 1e-12

    def describe(self) -> str:
        return {"accuracy": f"accuracy drop <= {self.limit:g} points",
                "agreement": f"top-1 agreement >= {self.limit:g}",
                "sqnr": f"SQNR >= {self.limit:g} dB"}[self.kind]

    def initial_noise(self) -> float:
        """A first guess of the summed per-layer output-noise energy (10^(-SQNR/10)) that keeps the budget; the
        search corrects it from verified models."""
        if self.kind == "sqnr":
            return 10 ** (-self.limit / 10)
        if self.kind == "agreement":
            return max(1e-4, 0.5 * (1 - self.limit))
        return max(1e-4, 0.01 * self.limit)

    def to_dict(self) -> dict:
        return asdict(self)


def budget_for(recipe, labelled: bool, classifier: bool) -> Budget:
    """The budget the recipe asks for, given what the data and the model allow."""
    if recipe.max_accuracy_drop is not None and labelled:
        return Budget("accuracy", float(recipe.max_accuracy_drop))
    if recipe.min_top1_agreement is not None and classifier:
        return Budget("agreement", float(recipe.min_top1_agreement))
    if recipe.min_sqnr is not None:
        return Budget("sqnr", float(recipe.min_sqnr))
    if labelled and classifier:
        return Budget("accuracy", DEFAULTS["accuracy"])
    if classifier:
        return Budget("agreement", DEFAULTS["agreement"])
    return Budget("sqnr", DEFAULTS["sqnr"])


def floor_warnings(fid: Fidelity, latency: dict | None, bytes_before: int | None, bytes_after: int | None,
                   degenerate: str | None) -> list[str]:
    """One line per floor the result is measured below: what a user must never miss."""
    out = []
    if fid.top1_agreement is not None and fid.top1_agreement < FLOOR_AGREEMENT:
        out.append(f"WARNING: top-1 agreement with the original is {100 * fid.top1_agreement:.1f}% "
                   f"(< {100 * FLOOR_AGREEMENT:.0f}%): the model is not a faithful compression")
    if fid.sqnr_db is not None and fid.sqnr_db < FLOOR_SQNR_DB:
        out.append(f"WARNING: output SQNR is {fid.sqnr_db:.1f} dB (< {FLOOR_SQNR_DB:g} dB): outputs differ strongly "
                   f"from the original's")
    if degenerate:
        out.append(f"WARNING: degenerate outputs: {degenerate}")
    if latency and latency.get("slower"):
        out.append(f"WARNING: the result is slower than the input on {latency.get('provider', 'cpu')} "
                   f"({latency['median_ms_after']:.2f} ms vs {latency['median_ms_before']:.2f} ms, interleaved)")
    if bytes_before and bytes_after and bytes_after > bytes_before:
        out.append(f"WARNING: the result is larger than the input ({bytes_after} vs {bytes_before} bytes)")
    return out


def degenerate_outputs(ref_std: float, new_std: float, new_max: float) -> str | None:
    """Outputs that carry no information: constant across samples, or vanishing, while the original's vary."""
    if not (math.isfinite(new_std) and math.isfinite(new_max)):
        return "outputs hold NaN or Inf"
    if ref_std > 0 and new_std < 1e-6 * ref_std:
        return f"outputs are constant across samples (std {new_std:.3g} vs {ref_std:.3g} for the original)"
    if ref_std > 0 and new_max < 1e-6 * ref_std:
        return f"outputs vanish (max |y| {new_max:.3g})"
    return None
