"""Findings: each analysis's measurements set beside the papers' claims, with their control and a verdict.

A finding is data (metrics.json's ``findings``, shown first in the report): the claim quoted with its source, our
measurement with its interval, the control or baseline it is measured against, and a verdict no stronger than
both: ``reproduced`` (the measurement beats its control, over ≥ 3 seeds with intervals that do not overlap),
``partly`` (it points the paper's way, but on one seed, within the intervals, or only under a weaker reading),
``not reproduced`` (the control is as good or better), or ``not tested``.

Every function takes the run's numbers as intervals (:func:`numbers_of`: a multi-seed parent's intervals over
seeds, or one run's numbers with n = 1) and returns a list of :class:`Finding`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from branchspec.seeds import format_interval, interval, is_seeds_parent, run_numbers

REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_TESTED = "reproduced", "partly", "not reproduced", "not tested"
MIN_SEEDS = 3


@dataclass
class Finding:
    claim: str  # quoted
    source: str  # where in the paper
    measurement: str
    control: str
    verdict: str

    def to_dict(self) -> dict:
        return asdict(self)


def numbers_of(run: str | Path) -> dict[str, dict]:
    """The run's numbers as intervals: a seeds parent's summary, or one run's numbers (n = 1)."""
    path = Path(run)
    if is_seeds_parent(path):
        return json.loads((path / "metrics.json").read_text()).get("summary", {})
    return {k: interval([v]) for k, v in run_numbers(path).items()}


def _get(numbers: dict, key: str) -> dict | None:
    value = numbers.get(key)
    return value if value and value.get("mean") is not None and math.isfinite(value["mean"]) else None


def _text(value: dict | None, digits: int = 3) -> str:
    return format_interval(value, digits) if value else "–"


def _seeds(*values) -> int:
    return min((v["n"] for v in values if v), default=0)


def compare(a: dict | None, b: dict | None, greater: bool = True) -> str:
    """The verdict of "a is above b" (``greater``; else below): reproduced with ≥ 3 seeds and separate intervals,
    partly when only the means agree, not reproduced when they do not."""
    if a is None or b is None:
        return NOT_TESTED
    sign = 1 if greater else -1
    if sign * (a["mean"] - b["mean"]) <= 0:
        return NOT_REPRODUCED
    if _seeds(a, b) >= MIN_SEEDS and a.get("ci95") and b.get("ci95"):
        lo_a, hi_a = a["ci95"]
        lo_b, hi_b = b["ci95"]
        if (lo_a > hi_b) if greater else (hi_a < lo_b):
            return REPRODUCED
    return PARTLY


def _seed_note(*values) -> str:
    n = _seeds(*values)
    return "" if n >= MIN_SEEDS else f" ({n} seed{'s' if n != 1 else ''}: fewer than {MIN_SEEDS})"


# ---------------------------------------------------------------------------------------------- classify
def classify(numbers: dict, prefix: str | None = None) -> list[Finding]:
    """Sec. 6: silent branches, weak correlation, experts; from ``classify analyze`` (the numbers of a training
    run, ``analysis/…``, or of its analysis folder)."""
    if prefix is None:
        prefix = "analysis/" if any(k.startswith("analysis/") for k in numbers) else ""
    g = lambda key: _get(numbers, prefix + key)  # noqa: E731
    out = []
    silent, silent_c, constant = g("num_silent"), g("num_silent_centred"), g("num_constant")
    if silent is not None:
        raw_found = silent["mean"] > 0
        centred_found = silent_c is not None and silent_c["mean"] > 0
        verdict = (REPRODUCED if raw_found and _seeds(silent) >= MIN_SEEDS else PARTLY if raw_found or centred_found
                   else NOT_REPRODUCED)
        out.append(Finding(
            "Some branches become experts in specific classes, while others are \"turned off\" and do not "
            "contribute to classification.", "Sec. 6, Figs. 5-6",
            f"silent branches (10% rule): {_text(silent, 2)} on raw responses, {_text(silent_c, 2)} on mean-centred "
            f"ones ({_text(constant, 2)} constant)" + _seed_note(silent),
            "the same rule at initialization: every branch active by construction (equal architectures)",
            verdict if verdict != PARTLY or raw_found else PARTLY + " (only on centred responses: constant branches)"))
    corr, corr0 = g("mean_abs_offdiagonal_correlation"), g("mean_abs_offdiagonal_correlation_at_init")
    if corr is not None:
        out.append(Finding("The response of each branch is lowly correlated to the response of other branches.",
                           "Sec. 4, observation 5; Fig. 5",
                           f"mean |correlation| between active branches {_text(corr)}" + _seed_note(corr),
                           f"at initialization {_text(corr0)}", compare(corr, corr0, greater=False)))
    share, share0 = g("mean_top_branch_share"), g("mean_top_branch_share_at_init")
    if share is not None:
        out.append(Finding("Branches differ by the classes they specialize in.", "Sec. 6, Figs. 6-7",
                           f"share of a class's positive contribution carried by its top branch {_text(share)}"
                           + _seed_note(share), f"at initialization {_text(share0)}", compare(share, share0)))
    per_class, per_class0 = g("mean_branches_per_class"), g("mean_branches_per_class_at_init")
    if per_class is not None:
        out.append(Finding("The networks tend not to share ROS's. That is, in each ROS very few networks are active "
                           "(and often only a single one is active).", "Sec. 4, observations 2-3 (a class as the ROS)",
                           f"branches active in a class (≥ 10% of its top contributor) {_text(per_class, 2)}; share "
                           f"of the classes in which a branch is silent {_text(g('mean_silent_class_share'))}"
                           + _seed_note(per_class), f"at initialization {_text(per_class0, 2)} branches per class",
                           compare(per_class, per_class0, greater=False)))
    return out


# ------------------------------------------------------------------------------------------------ hessian
def hessian(numbers: dict, prefix: str = "") -> list[Finding]:
    """Sec. 5/8, Fig. 5 panels 3-4: the first-layer Hessian's block structure at convergence."""
    g = lambda key: _get(numbers, prefix + key)  # noqa: E731
    last, init = g("block_mass_ratio/last"), g("block_mass_ratio/init")
    base = g("block_mass_ratio_permuted/last")
    if last is None:
        return []
    out = [Finding("An almost block-diagonal Hessian is obtained, with 16 blocks corresponding to the 16 branches.",
                   "Sec. 6, Fig. 5 panels 3-4", f"block mass at convergence {_text(last)}" + _seed_note(last),
                   f"the parameters dealt into blocks at random: {_text(base)}", compare(last, base))]
    if init is not None:
        out.append(Finding("The specialization process happens naturally through gradient descent optimization.",
                           "Sec. 4, observation 7; Sec. 5, 8",
                           f"block mass at convergence {_text(last)} against {_text(init)} at initialization",
                           "the same network before training", compare(last, init)))
    return out


# ---------------------------------------------------------------------------------------------- decompose
def decompose(numbers: dict, prefix: str | None = None) -> list[Finding]:
    """Sec. 7: branches that decompose images, against fixed decompositions (layered scenes); the numbers of a
    training run (``apply/…``) or of its apply folder."""
    if prefix is None:
        prefix = "apply/" if any(k.startswith("apply/") for k in numbers) else ""
    g = lambda key: _get(numbers, prefix + key)  # noqa: E731
    rec, sdr = g("component_recovery"), g("si_sdr")
    if rec is None:
        return _real_decomposition(g)
    margin, sdr_margin = g("against_baselines/recovery_margin"), g("against_baselines/si_sdr_margin")
    if margin is None:
        verdict = NOT_TESTED
    elif margin["mean"] >= 0.10 and sdr_margin is not None and sdr_margin["mean"] >= 3.0:
        verdict = REPRODUCED if _seeds(margin) >= MIN_SEEDS and margin["ci95"] and margin["ci95"][0] >= 0.10 else PARTLY
    elif margin["mean"] > 0:
        verdict = PARTLY
    else:
        verdict = NOT_REPRODUCED
    return [Finding("Branched generative networks naturally decompose [...] images to meaningful channels.",
                    "Abstract; Sec. 7, Figs. 10-11",
                    f"component recovery {_text(rec)}, SI-SDR {_text(sdr, 1)} dB" + _seed_note(rec),
                    f"the best fixed decomposition with at most M candidates; the branches' margin over it: recovery "
                    f"{_text(margin)}, SI-SDR {_text(sdr_margin, 1)} dB (the bar: +0.10 and +3 dB)", verdict)]


def _real_decomposition(g) -> list[Finding]:
    """Real images have no true layers: the branches against frequency bands (are they more than a filter bank?)
    and the translations against doing nothing (the Fréchet distance of the untranslated images)."""
    out = []
    band, dominant, dog = (g("band_energy/mean_best_dog_band_correlation"),
                           g("band_energy/mean_branch_dominant_band_share"), g("band_energy/mean_dog_dominant_band_share"))
    if band is not None:
        verdict = NOT_REPRODUCED if band["mean"] >= 0.8 else PARTLY  # meaning is not measured: at best "partly"
        out.append(Finding("Branched generative networks naturally decompose [...] images to meaningful channels.",
                           "Abstract; Sec. 7, Figs. 10-11 (real images: no true layers)",
                           f"a branch's best |corr| with one difference-of-Gaussians band {_text(band)}; share of "
                           f"its energy in its dominant octave {_text(dominant)}" + _seed_note(band),
                           f"a DoG band's own dominant share {_text(dog)} (a branch that is one band correlates "
                           "≈ 1 with it)", verdict))
    fd, untranslated = g("mean_frechet_distance"), g("mean_frechet_distance_untranslated")
    if fd is not None and untranslated is not None:
        out.append(Finding("Class transfer: images translated into the target domain.", "Sec. 7, Fig. 9",
                           f"Fréchet distance of translations to real images of the target {_text(fd, 1)}"
                           + _seed_note(fd), f"the untranslated images: {_text(untranslated, 1)}",
                           compare(fd, untranslated, greater=False)))
    return out


# -------------------------------------------------------------------------------------------------- nad
def nad(numbers: dict, prefix: str = "") -> list[Finding]:
    """NAD's findings and its misclassification claim, from ``nad evaluate``."""
    g = lambda key: _get(numbers, prefix + key)  # noqa: E731
    out = []
    last3 = g("hit_rate/last3_mean")
    if last3 is not None:
        chance = {"mean": 0.25, "n": 99, "ci95": [0.25, 0.25]}
        out.append(Finding("DNNs can be divided into sub-architectures for independent tasks.", "NAD, abstract",
                           f"hit rate of the last three layers {_text(last3)}" + _seed_note(last3),
                           "chance 0.25 (a sub-architecture's saliency falls on its own image in 1 of 4 tiles)",
                           compare(last3, chance)))
    rate, perm_p = g("misclassification/rate"), g("misclassification/permutation_p")
    if rate is not None:
        chance = g("misclassification/chance")
        trivial = g("misclassification/trivial_baseline/rate")
        significant = perm_p is not None and perm_p["mean"] < 0.05
        beats_trivial = trivial is not None and rate["mean"] > trivial["mean"]
        verdict = (PARTLY if significant and not beats_trivial else
                   (REPRODUCED if _seeds(rate) >= MIN_SEEDS else PARTLY) if significant and beats_trivial
                   else NOT_REPRODUCED)
        out.append(Finding("Misclassified images have a high probability of being assigned to task sub-architectures "
                           "similar to the correct ones.", "NAD, abstract",
                           f"true class among the 3 most similar sub-architectures {_text(rate)} (chance "
                           f"{_text(chance)}; class-permutation p {_text(perm_p)})" + _seed_note(rate),
                           f"the trivial similarity of class-mean features: {_text(trivial)}", verdict))
    fpr = g("detection/mean_false_positive_rate")
    if fpr is not None:
        out.append(Finding("(Not claimed by the authors.) A sub-architecture still classifies, and only its task.",
                           "NAD, our test", f"false-positive rate of the sub-architectures as detectors {_text(fpr)}",
                           "an ideal detector: 0", NOT_REPRODUCED if fpr["mean"] > 0.5 else PARTLY))
    return out


# --------------------------------------------------------------------------------------------------- toy
def toy(numbers: dict, prefix: str = "") -> list[Finding]:
    """Sec. 4.1: success against M (Fig. 3) and the active/silent counts (Fig. 4) of a toy sweep."""
    ms = sorted(int(k.split("/")[1]) for k in numbers if k.startswith(prefix + "success_rate/"))
    if not ms:
        return []
    g = lambda key: _get(numbers, prefix + key)  # noqa: E731
    lo, hi = g(f"success_rate/{ms[0]}"), g(f"success_rate/{[m for m in ms if m >= 10][0] if any(m >= 10 for m in ms) else ms[-1]}")
    out = [Finding("As the number of branches increases the optimization task is easier (success rate increases "
                   "monotonically) and around 100% success rate is reached for 10 branches or more.",
                   "Sec. 4.1, Fig. 3", f"success rate {_text(lo)} at M = {ms[0]}, {_text(hi)} at M ≥ 10",
                   f"M = {ms[0]}", REPRODUCED if hi and lo and hi["mean"] >= 0.95 > lo["mean"] else PARTLY)]
    active_lo, active_hi = g(f"mean_active/{ms[0]}"), g(f"mean_active/{ms[-1]}")
    silent_hi = g(f"mean_silent/{ms[-1]}")
    if active_hi is not None:
        out.append(Finding("The number of active branches may be almost constant for different M, if M is large "
                           "enough.", "Sec. 4, observation 6; Fig. 4",
                           f"active branches {_text(active_lo, 2)} at M = {ms[0]}, {_text(active_hi, 2)} at M = "
                           f"{ms[-1]}; silent {_text(silent_hi, 2)}", f"M = {ms[-1]} branches in all",
                           PARTLY if active_hi["mean"] < ms[-1] / 3 else NOT_REPRODUCED))
    return out


def write(run, kind: str, source: str | Path | None = None) -> list[dict]:
    """Compute the findings of ``kind`` from the numbers of ``source`` (default: ``run``) and write them into
    ``run``'s metrics.json (``findings``). Returns them as dicts."""
    from branchspec.rundir import RunDir

    run = RunDir.of(run)
    numbers = numbers_of(source or run.path)
    found = [f.to_dict() for f in KINDS[kind](numbers)]
    run.write_metrics({"findings": found})
    return found


KINDS = {"classify": classify, "hessian": hessian, "decompose": decompose, "nad": nad, "toy": toy}
# the findings of a multi-seed parent, by the command of its runs: (kind, where its numbers are in a run)
COMMANDS = {"classify train": [("classify", "analysis/"), ("hessian", "hessian/"), ("nad", "nad/")],
            "decompose train": [("decompose", "apply/")]}


def write_parent(parent, command: str) -> list[dict]:
    """The findings of a multi-seed parent, from its intervals over the seeds, into its metrics.json."""
    from branchspec.rundir import RunDir

    parent = RunDir.of(parent)
    numbers = numbers_of(parent.path)
    found = [f.to_dict() for kind, prefix in COMMANDS.get(command, []) for f in KINDS[kind](numbers, prefix)]
    parent.write_metrics({"findings": found})
    return found
