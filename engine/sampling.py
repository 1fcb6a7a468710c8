"""One host sampler call per pass with per-evaluation hooks that may change the sampler's state (reusable: the key
frame sampler, FRESCO).

`steered_sampler(sampler_name, hooks)` is a KSAMPLER wrapping the host's own sampler function. Inside the call it
first probes the sampler (the same function on a model that predicts 0, in float64: no UNet call) for the σ of
each evaluation and its linear response to the state (rerender.evaluation_plan), then runs it once over the
whole schedule. Its model function, per evaluation:
  state the model sees = sampler's x + O (O carried by the response),
  hooks.before(evaluation, state) may return a new state (O absorbs the difference),
  the model is called (or hooks.replay returns a recorded output, except for samplers that read the CFG halves),
  hooks.after(evaluation, state, x̂0) may return an edited x̂0: the sampler still gets the model's own x̂0, and the
  edit δ reaches the state by the hooks' `x0_edit_rule`:
    "ddim"    - the state entering the next step moves by exactly a(σ)·δ (Rerender's DDIM rule "edited x̂0, the
                UNet's own noise"), for every sampler alike (the Key Frame Sampler);
    "sampler" - as if the model had predicted the edited x̂0: every later state moves by the running sampler's own
                response to that prediction (a second probe: a model that predicts 0 except a unit x̂0 at that
                evaluation), multistep history included; with ddpm that is the posterior mean's x̂0 coefficient
                β_t/(1-ᾱ_t) = 1 - σ_{i+1}²/σ_i², as FRESCO's official DDPM step takes its smoothed x̂0 (FRESCO).
"""
from typing import Dict, List, Optional, Tuple

import comfy.samplers
import torch

from ..rerender.evaluation_plan import Evaluation, EvaluationPlan

# Samplers that choose their own evaluation points (error-controlled or on their own grid): no step of the
# schedule can be told apart, so Rerender's per-step constraints cannot be placed.
REFUSED_SAMPLERS = {
    "dpm_adaptive": "adaptive step size: where it evaluates depends on the model's predictions",
    "dpm_fast": "runs its own DPM-Solver grid between the first and last σ, not the schedule's steps",
}
PROBE_TOLERANCE = 1e-6
X0_EDIT_RULES = ("ddim", "sampler")


def supported_samplers():
    return [name for name in comfy.samplers.KSampler.SAMPLERS if name not in REFUSED_SAMPLERS]


def refusal(sampler_name: str, node_name: str) -> Optional[str]:
    """The error text for a sampler the steered sampling cannot run, else None."""
    if sampler_name in REFUSED_SAMPLERS:
        return (f"{node_name}: sampler {sampler_name!r} cannot run Rerender's per-step constraints "
                f"({REFUSED_SAMPLERS[sampler_name]}); use one of: {', '.join(supported_samplers())}.")
    if sampler_name not in comfy.samplers.KSampler.SAMPLERS:
        return f"{node_name}: unknown sampler {sampler_name!r}; use one of: {', '.join(supported_samplers())}."
    return None



def schedule_refusal(steps: int, denoise: float, sampler_name: str, scheduler: str, node_name: str) -> Optional[str]:
    """The error text for a schedule a steered pass cannot run (steps, denoise, sampler, scheduler), else None."""
    if steps < 1 or not 0.0 < denoise <= 1.0:
        return f"{node_name}: need steps >= 1 and 0 < denoise <= 1 (got {steps}, {denoise})."
    problem = refusal(sampler_name, node_name)
    if problem:
        return problem
    if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        return f"{node_name}: unknown scheduler {scheduler!r}."
    return None


class SteeringHooks:
    """What a pass does at its evaluations; every method may be left as is. `plan` is set before the run;
    `x0_edit_rule` (one of X0_EDIT_RULES, see the module doc) says how an edit `after` returns reaches the state."""
    plan: Optional[EvaluationPlan] = None
    x0_edit_rule: str = "ddim"

    def start(self, plan: EvaluationPlan) -> None:
        self.plan = plan

    def before(self, evaluation: Evaluation, state: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def replay(self, evaluation: Evaluation) -> Optional[torch.Tensor]:
        return None

    def after(self, evaluation: Evaluation, state: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        return denoised

    def finish(self, sample: torch.Tensor) -> None:
        pass


class _ZeroModel:
    """The sampler's model function with every prediction `value`, or (`unit_at` given) 0 except an x̂0 of 1 at
    evaluation `unit_at`, its uncond half left 0 (the response to the x̂0 alone); the host model's attributes kept."""

    def __init__(self, model, value: float, unit_at: Optional[int] = None):
        self.model, self.value, self.unit_at, self.seen = model, value, unit_at, []

    def __call__(self, x, sigma, **extra_args):
        index = len(self.seen)
        self.seen.append((x.detach().clone(), float(sigma.flatten()[0])))
        if self.unit_at is None:
            out = torch.full_like(x, self.value)
            uncond = out
        else:
            out = torch.full_like(x, 1.0 if index == self.unit_at else 0.0)
            uncond = torch.zeros_like(x)
        for fn in extra_args.get("model_options", {}).get("sampler_post_cfg_function", []):
            out = fn({"denoised": out, "cond_denoised": out, "uncond_denoised": uncond, "model": self.model,
                      "sigma": sigma, "input": x, "cond": x - out, "uncond": x - uncond, "cond_scale": 1.0,
                      "model_options": extra_args.get("model_options", {})})
        return out

    def __getattr__(self, name):
        return getattr(self.model, name)


def _probe_run(function, model, x, sigmas, extra_args, options, start: float, value: float, dtype,
               unit_at: Optional[int] = None):
    zero = _ZeroModel(model, value, unit_at)
    args = {k: v for k, v in (extra_args or {}).items() if k != "denoise_mask"}
    args["model_options"] = dict(args.get("model_options", {}))
    probe_x = torch.full(x.shape, start, dtype=dtype, device=x.device)
    out = function(zero, probe_x, sigmas.clone(), extra_args=args, callback=None, disable=True, **options)
    return zero.seen, out


def probe_plan(function, model, x, sigmas, extra_args, options, schedule, first_step) -> EvaluationPlan:
    """Evaluation σs and state response of `function` on this schedule, checked to be affine in the state
    independently of the predictions (what the offset carry relies on)."""
    def probe(dtype):
        return {(start, value): _probe_run(function, model, x, sigmas, extra_args, options, start, value, dtype)
                for start, value in ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0))}
    runs = _in_float64(probe, x)
    sigma_runs = [[s for _, s in seen] for seen, _ in runs.values()]
    if any(len(r) != len(sigma_runs[0]) or any(abs(a - b) > 1e-6 * max(abs(a), 1e-8) for a, b in zip(r, sigma_runs[0]))
           for r in sigma_runs):
        raise RuntimeError("the sampler's evaluation points depend on the model's predictions (adaptive).")

    def response(pair_one, pair_zero):
        (seen_one, out_one), (seen_zero, out_zero) = runs[pair_one], runs[pair_zero]
        per_eval = [(a - b) for (a, _), (b, _) in zip(seen_one, seen_zero)] + [out_one - out_zero]
        return per_eval

    base, shifted = response((1.0, 0.0), (0.0, 0.0)), response((1.0, 1.0), (0.0, 1.0))
    values = []
    for a, b in zip(base, shifted):
        scale = a.flatten()[0]
        if (a - scale).abs().max() > PROBE_TOLERANCE or (b - a).abs().max() > PROBE_TOLERANCE:
            raise RuntimeError("the sampler is not affine in its state with prediction-independent coefficients.")
        values.append(float(scale))
    return EvaluationPlan.from_sigmas([float(s) for s in schedule], first_step, sigma_runs[0], values[:-1],
                                      values[-1])


def _in_float64(probe, x):
    try:
        return probe(torch.float64)  # float64: a stochastic sampler's noise cancels to ~1e-15 in the differences
    except RuntimeError:
        return probe(x.dtype)        # UniPC solves in the schedule's dtype (it is deterministic: exact anyway)


def probe_x0_response(function, model, x, sigmas, extra_args, options, index: int) -> Tuple[float, ...]:
    """d(state at every evaluation, then the returned sample) / d(x̂0 predicted at evaluation `index`): the
    sampler run on a model that predicts 0 but a unit x̂0 at `index`, against the all-zero run."""
    def probe(dtype):
        return [_probe_run(function, model, x, sigmas, extra_args, options, 0.0, 0.0, dtype, unit_at)
                for unit_at in (None, index)]
    (seen_zero, out_zero), (seen_unit, out_unit) = _in_float64(probe, x)
    values = []
    for difference in [a - b for (a, _), (b, _) in zip(seen_unit, seen_zero)] + [out_unit - out_zero]:
        scale = difference.flatten()[0]
        if (difference - scale).abs().max() > PROBE_TOLERANCE:
            raise RuntimeError("the sampler's response to its prediction is not uniform over the latent.")
        values.append(float(scale))
    return tuple(values)


class _SteeredModel:
    """The sampler's model function: the model called at the steered state, hooks around each evaluation."""

    def __init__(self, model, plan: EvaluationPlan, hooks: SteeringHooks, model_sampling, x0_response):
        self.model, self.plan, self.hooks, self.model_sampling = model, plan, hooks, model_sampling
        self.x0_response = x0_response
        self.index, self.offset, self.pending_edit = 0, None, None
        # x̂0 edits under the "sampler" rule: per edit, what it adds at later evaluations beyond what the state
        # carry brings there (its direct effect, then its multistep history use), and δ
        self.x0_edits: List[Tuple[Dict[int, float], torch.Tensor]] = []

    def _shift(self, shift):
        self.offset = shift if self.offset is None else self.offset + shift

    def _carry(self, index):
        factor = self.plan.carry(index)
        if self.offset is not None:
            self.offset = self.offset * factor
        for added, delta in self.x0_edits:
            if index in added:
                self._shift(added[index] * delta)
        self.x0_edits = [(added, delta) for added, delta in self.x0_edits if max(added) > index]

    def _edit_as_prediction(self, index, delta):
        """The "sampler" rule: the state at every later evaluation m moves by response[m]·δ, response = the
        sampler's own d(state at m)/d(x̂0 at `index`); the carry brings carry(m)·response[m-1] of it from m-1."""
        response = self.x0_response(index)
        added = {m: response[m] - self.plan.carry(m) * response[m - 1] for m in range(index + 1, len(response))}
        added = {m: value for m, value in added.items() if abs(value) > PROBE_TOLERANCE * 1e-3}
        if added:
            self.x0_edits.append((added, delta))

    def _apply_pending(self, sigma):
        if self.pending_edit is not None:
            shift = self.model_sampling.noise_scaling(sigma, torch.zeros_like(self.pending_edit), self.pending_edit)
            self._shift(shift)
            self.pending_edit = None

    def __call__(self, x, sigma, **extra_args):
        if self.index >= len(self.plan):
            raise RuntimeError("the sampler evaluated the model more often than its probe did.")
        evaluation = self.plan.evaluations[self.index]
        if abs(float(sigma.flatten()[0]) - evaluation.key.sigma) > 1e-4 * max(evaluation.key.sigma, 1e-8):
            raise RuntimeError(f"evaluation {self.index} at σ={float(sigma.flatten()[0]):.6g}, its probe at "
                               f"σ={evaluation.key.sigma:.6g}: the sampler does not follow its schedule.")
        if self.index > 0:
            self._carry(self.index)
        if evaluation.starts_step:
            self._apply_pending(sigma.flatten()[0])
        state = x if self.offset is None else x + self.offset.to(x)
        changed = self.hooks.before(evaluation, state)
        if changed is not None:
            self.offset = (changed - x) if self.offset is None else self.offset + (changed - state)
            state = changed
        # A sampler that reads the CFG halves through a post-CFG function (the *_cfg_pp ones) needs the model
        # really called; elsewhere a recorded output may stand in for an evaluation known to be identical.
        reads_cfg = extra_args.get("model_options", {}).get("sampler_post_cfg_function")
        denoised = None if reads_cfg else self.hooks.replay(evaluation)
        if denoised is None:
            denoised = self.model(state, sigma, **extra_args)
        edited = self.hooks.after(evaluation, state, denoised)
        if edited is not denoised:
            if self.hooks.x0_edit_rule == "sampler":
                self._edit_as_prediction(self.index, edited - denoised)
            else:
                self.pending_edit = edited - denoised
        self.index += 1
        return denoised

    def finish(self, sample):
        if self.index != len(self.plan):
            raise RuntimeError("the sampler evaluated the model less often than its probe did.")
        self._carry(len(self.plan))
        self._apply_pending(torch.zeros((), device=sample.device))
        return sample if self.offset is None else sample + self.offset.to(sample)

    def __getattr__(self, name):
        return getattr(self.model, name)


def steered_sampler(sampler_name: str, hooks: SteeringHooks, schedule: torch.Tensor, first_step: int,
                    plans: Optional[dict] = None) -> comfy.samplers.KSAMPLER:
    """The host's sampler `sampler_name` run once over its sigmas with `hooks` at every evaluation; `schedule` is
    the full schedule (T+1 sigmas) and `first_step` the index of the first executed step in it. `plans` (a dict
    kept across calls) saves re-probing passes with the same sigmas, latent shape and seed."""
    base = comfy.samplers.sampler_object(sampler_name)
    function = base.sampler_function
    options = dict(base.extra_options)

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **extra_options):
        run_options = {**options, **extra_options}
        # the probes' arguments as they come in: a sampler adds its own post-CFG function to `extra_args` (the
        # *_cfg_pp ones), which a probe made during the run must not call (it would overwrite the run's state)
        probe_args = dict(extra_args or {})
        key = (sampler_name, tuple(float(v) for v in sigmas), tuple(x.shape), (extra_args or {}).get("seed"))
        plan = None if plans is None else plans.get(key)
        if plan is None:
            plan = probe_plan(function, model, x, sigmas, probe_args, run_options, schedule, first_step)
            if plans is not None:
                plans[key] = plan
        def x0_response(index):
            cached = None if plans is None else plans.get(("x0 response", key, index))
            if cached is None:
                cached = probe_x0_response(function, model, x, sigmas, probe_args, run_options, index)
                if plans is not None:
                    plans[("x0 response", key, index)] = cached
            return cached

        if hooks.x0_edit_rule not in X0_EDIT_RULES:
            raise ValueError(f"x̂0 edit rule {hooks.x0_edit_rule!r}: use one of {X0_EDIT_RULES}.")
        hooks.start(plan)
        steered = _SteeredModel(model, plan, hooks, model.inner_model.inner_model.model_sampling, x0_response)
        out = function(steered, x, sigmas.clone(), extra_args=extra_args, callback=callback, disable=disable,
                       **run_options)
        out = steered.finish(out)
        hooks.finish(out)
        return out

    sample.__name__ = getattr(function, "__name__", sampler_name)
    return comfy.samplers.KSAMPLER(sample, {}, base.inpaint_options)

