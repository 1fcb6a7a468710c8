"""Which model evaluation of a sampling run belongs to which step, and how a sampler carries a state change.

A run of a host sampler is a fixed sequence of model evaluations (for every non-adaptive sampler the σ of each
evaluation follows from the schedule alone). Constraints that act "at step i" act at the evaluations of step i;
caches that pair a key frame's evaluation with the anchor's are keyed by the evaluation's index in that sequence,
checked against its σ (`EvaluationKey`), so a Heun correction at σ_{i+1} and the next step's first evaluation at
the same σ never share an entry.

A state change Δ at an evaluation (the blend of pixel-aware fusion, an x̂0 edit carried into x) is not written into
the sampler's own variable, which no host interface exposes: the sampler keeps integrating its own x, the model is
called at x + O, and the offset O is carried from evaluation to evaluation by the sampler's own linear response to
its state (`response`, measured by running the sampler on a model that predicts 0). Every host sampler is affine in
its state with coefficients that depend on the schedule only, so this is exact: the model sees the state the
sampler would have after the change, multistep history included.
"""
import dataclasses
from typing import List, Optional, Sequence, Tuple

SIGMA_TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class EvaluationKey:
    """One model evaluation of a pass: its index in the pass and the σ it is made at."""
    index: int
    sigma: float

    def matches(self, other: "EvaluationKey") -> bool:
        return self.index == other.index and _same_sigma(self.sigma, other.sigma)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    key: EvaluationKey
    step: int            # step of the full schedule it belongs to
    starts_step: bool    # the evaluation at the state entering that step (where the reference evaluates)


def _same_sigma(a: float, b: float) -> bool:
    return abs(a - b) <= SIGMA_TOLERANCE * max(abs(a), abs(b), 1e-8)


@dataclasses.dataclass(frozen=True)
class EvaluationPlan:
    """The evaluations of one pass and the sampler's response to a state change.

    `response[k]` is d(state the model sees at evaluation k) / d(initial state) and `final_response` the same for
    the returned sample; a change made at evaluation j reaches evaluation k scaled by response[k] / response[j]."""
    evaluations: Tuple[Evaluation, ...]
    response: Tuple[float, ...]
    final_response: float

    @classmethod
    def from_sigmas(cls, schedule: Sequence[float], first_step: int, sigmas_seen: Sequence[float],
                    response: Sequence[float], final_response: float) -> "EvaluationPlan":
        """Attribute each evaluation to a step of the full schedule (T+1 descending sigmas, the run executing steps
        first_step..T-1): step i starts at the LAST evaluation at σ_i (an earlier one at σ_i is the previous step's
        correction, as Heun's); evaluations between σ_i and σ_{i+1} belong to step i."""
        points = list(schedule)
        steps: List[int] = []
        for sigma in sigmas_seen:
            inside = [i for i in range(first_step, len(points) - 1) if sigma <= points[i] * (1 + SIGMA_TOLERANCE)]
            step = inside[-1] if inside else first_step
            if step + 1 < len(points) - 1 and _same_sigma(sigma, points[step + 1]):
                step += 1
            steps.append(step)
        starts = {}
        for index, (sigma, step) in enumerate(zip(sigmas_seen, steps)):
            if _same_sigma(sigma, points[step]) or (step == first_step and sigma > points[step]):
                starts[step] = index
        evaluations = []
        for index, (sigma, step) in enumerate(zip(sigmas_seen, steps)):
            if step in starts and index < starts[step]:
                step -= 1  # an evaluation at σ_i before step i starts: the correction of step i-1
            evaluations.append(Evaluation(EvaluationKey(index, float(sigma)), step, starts.get(step) == index))
        return cls(tuple(evaluations), tuple(float(r) for r in response), float(final_response))

    def __len__(self) -> int:
        return len(self.evaluations)

    def carry(self, index: int) -> float:
        """Factor that takes the offset at evaluation index-1 to evaluation `index` (len(self): to the output)."""
        previous = self.response[index - 1]
        current = self.final_response if index == len(self.response) else self.response[index]
        return 0.0 if previous == 0.0 else current / previous

    def first_evaluation_of_step(self, step: int) -> Optional[int]:
        return next((e.key.index for e in self.evaluations if e.step >= step), None)

    def steps_without_start(self, steps) -> List[int]:
        """Steps of `steps` with no evaluation at their own state (a constraint there cannot act)."""
        started = {e.step for e in self.evaluations if e.starts_step}
        return sorted(set(steps) - started)
