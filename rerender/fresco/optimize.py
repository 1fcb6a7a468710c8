"""FRESCO-aware feature optimisation (reference §4.6), free of the host.

The decoder up-block input features of a batch are optimised for a few Adam steps against two losses, then
re-normalised to their original per-sample, per-channel mean and std. Two forms of the losses (`LOSS_FORMS`):

* "code" (the default; FRESCO's src/diffusion_hacked.py `optimize_feature`, which made the official results):
  spatial = 100 * mean |F F^T - R R^T| (F.l1_loss, `intra_weight=1e2`), F / R the L2-normalised token vectors
  [HW, C] of the feature / of the intra-frame reference (Gram = cosine similarities between tokens); temporal =
  2 * mean over the CYCLIC pairs k -> k+1 (wrap pair N-1 -> 0 included) of |f_{k+1} - warp(f_k, bwd)| (1 - occ_bwd)
  + |f_k - warp(f_{k+1}, fwd)| (1 - occ_fwd); Adam at lr 0.2 (`LEARNING_RATE`), the LAST iterate returned.
* "paper" (Eq. 5 / 6): spatial = 50 * mean (F F^T - R R^T)^2; temporal = mean over the adjacent pairs of
  |(f_{k+1} - warp(f_k)) (1 - occ)|, one direction, no wrap pair; the paper's lr is 0.4. The iterate with the
  lowest objective is returned (the pack's guard: at a fixed rate Adam oscillates on the L1 flow loss once the
  residuals are smaller than the rate). Its squared-L2 Gram loss can be computed from C x C matrices,
  ||F F^T - R R^T||^2 = ||F^T F||^2 - 2 ||F^T R||^2 + ||R^T R||^2, which bounds the memory at the 64x64 layer
  (HW = 4096 > C = 640) where the HW x HW Gram matrices cost about a gigabyte per batch of 8; the L1 form of the
  code cannot be rewritten that way and always keeps the HW x HW matrices, as the reference does.

Each loss is switched by giving or withholding its input: the spatial (Gram) loss runs iff a `GramReference` is
given, the temporal (flow) loss iff flows are given (the reference's comments and UI swap the two names). Means over
frames, tokens and channels, as the reference's reductions.

The host runs nodes under torch.inference_mode; everything here re-enables autograd locally and clones what comes
in, so only the feature tensor is optimised and no model weight is touched.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .geometry import CyclicFlows
from ..warp import sampling_grid


@dataclass(frozen=True)
class LossForm:
    """How the two losses are written and which iterate is returned (see the module doc)."""
    gram_distance: str              # "l1" or "squared"
    spatial_weight: float
    temporal_both_directions: bool  # cyclic pairs, both directions (code) / adjacent pairs, forward (paper)
    temporal_weight: float
    keep_best: bool                 # the lowest-objective iterate (else the last one)


LOSS_FORMS = {"code": LossForm("l1", 100.0, True, 2.0, keep_best=False),
              "paper": LossForm("squared", 50.0, False, 1.0, keep_best=True)}
DEFAULT_FORM = "code"
ITERATIONS = 20         # code: 20 closure steps (paper K = 20)
LEARNING_RATE = 0.2     # code (paper: 0.4)
FLOAT_BYTES = 4
NORMALIZE_EPS = 1e-12   # F.normalize's
GRAM_FORMS = ("auto", "tokens", "channels")
GRAM_DISTANCES = ("l1", "squared")


def normalized_tokens(features: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h*w, C], each token vector scaled to unit length."""
    return F.normalize(features.float().flatten(2).transpose(1, 2), dim=-1, eps=NORMALIZE_EPS)


class _TokenGramDistance(torch.autograd.Function):
    """mean over samples and entries of |T T^T - G| (l1) or (T T^T - G)^2 (squared), T = `normalized_tokens` of
    the features [B, C, h, w], G the reference Gram matrices [B, HW, HW], with the gradient written out. Autograd
    would walk HW x HW tensors about six times an iteration (the product, difference, |.|, its sign, the mean's
    expansion) and run three batched products (T T^T and one per operand in backward); here the difference is
    made by one product (baddbmm) and turned in place into the distance's derivative E, and since T T^T - G is
    symmetric so is E: dL/dT = (E + E^T) T = 2 E T, one product. The same values up to float order, and one
    HW x HW buffer per iteration instead of three."""

    @staticmethod
    def forward(ctx, features, gram, squared: bool):
        rows = features.float().flatten(2).transpose(1, 2)
        norms = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
        denominators = norms.clamp_min(NORMALIZE_EPS)
        tokens = rows / denominators
        difference = torch.baddbmm(gram, tokens, tokens.transpose(1, 2), beta=-1)
        count = difference.numel()
        if squared:
            loss = torch.linalg.vector_norm(difference).square() / count
            derivative_scale = 4.0 / count           # d/dT of (TT^T - G)^2: 2 (E + E^T) T, E = D
        else:
            loss = torch.linalg.vector_norm(difference, ord=1) / count
            difference.sign_()                        # abs' derivative (sign, 0 at 0, as autograd's sgn)
            derivative_scale = 2.0 / count
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(tokens, denominators, norms >= NORMALIZE_EPS, difference)
            ctx.derivative_scale, ctx.shape = derivative_scale, features.shape
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        tokens, denominators, normalised, derivative = ctx.saved_tensors
        grad_tokens = torch.bmm(derivative, tokens).mul_(grad_loss * ctx.derivative_scale)
        # through T = x / max(|x|, eps) (F.normalize): (g - T (g . T)) / |x| where |x| >= eps, g / eps elsewhere
        radial = (grad_tokens * tokens).sum(dim=-1, keepdim=True) * normalised
        grad_rows = (grad_tokens - tokens * radial) / denominators
        return grad_rows.transpose(1, 2).reshape(ctx.shape), None, None


def gram_form_bytes(channels: int, tokens: int, samples: int) -> dict:
    """Estimated bytes of the spatial loss per layer in each form: `reference` (kept for the whole batch) and
    `working` (alive during one Adam iteration: the one Gram-sized buffer `_TokenGramDistance` keeps, or the C x C
    products and their gradients)."""
    return {"tokens": {"reference": samples * tokens * tokens * FLOAT_BYTES,
                       "working": samples * tokens * tokens * FLOAT_BYTES},
            "channels": {"reference": samples * (tokens * channels + 1) * FLOAT_BYTES,
                         "working": 4 * samples * channels * channels * FLOAT_BYTES}}


def choose_gram_form(channels: int, tokens: int, samples: int, distance: str = "squared") -> str:
    """The form with the smaller reference + working memory for this layer ("tokens" for the L1 distance, the
    only form it has)."""
    if distance == "l1":
        return "tokens"
    costs = {form: sum(sizes.values()) for form, sizes in gram_form_bytes(channels, tokens, samples).items()}
    return min(costs, key=costs.get)


class GramReference:
    """The intra-frame reference of one layer for the spatial loss, in the memory form chosen for it: "tokens"
    keeps the HW x HW Gram matrices R R^T; "channels" (squared distance only) keeps R and ||R^T R||^2 and evaluates
    the loss through C x C products. Both give the same loss (up to float rounding)."""

    def __init__(self, features: torch.Tensor, form: str = "auto",
                 distance: str = LOSS_FORMS[DEFAULT_FORM].gram_distance):
        if form not in GRAM_FORMS:
            raise ValueError(f"Gram form must be one of {GRAM_FORMS}, got {form!r}")
        if distance not in GRAM_DISTANCES:
            raise ValueError(f"Gram distance must be one of {GRAM_DISTANCES}, got {distance!r}")
        if distance == "l1" and form == "channels":
            raise ValueError("the L1 Gram distance has no C x C form; use form 'tokens' or 'auto'")
        samples, channels, h, w = features.shape
        self.shape, self.distance = (channels, h, w), distance
        self.form = choose_gram_form(channels, h * w, samples, distance) if form == "auto" else form
        with torch.inference_mode(False):
            tokens = normalized_tokens(features.detach().clone())
            if self.form == "tokens":
                self.gram = tokens @ tokens.transpose(1, 2)
                self.tokens, self.constant = None, None
            else:
                self.gram = None
                self.tokens = tokens
                self.constant = (tokens.transpose(1, 2) @ tokens).pow(2).sum(dim=(1, 2))

    def loss(self, features: torch.Tensor) -> torch.Tensor:
        """Mean over samples and Gram entries of |F F^T - R R^T| (l1) or (F F^T - R R^T)^2 (squared)."""
        if tuple(features.shape[1:]) != self.shape:
            raise ValueError(f"spatial loss: a feature of {tuple(features.shape[1:])} against a reference of "
                             f"{self.shape}")
        if self.form == "tokens":
            return _TokenGramDistance.apply(features, self.gram, self.distance == "squared")
        tokens = normalized_tokens(features)
        count = tokens.shape[1] ** 2
        own = (tokens.transpose(1, 2) @ tokens).pow(2).sum(dim=(1, 2))
        cross = (tokens.transpose(1, 2) @ self.tokens).pow(2).sum(dim=(1, 2))
        return ((own - 2 * cross + self.constant) / count).mean()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gram, self.tokens, self.constant) if t is not None)


class BranchGramReference:
    """The spatial loss of a feature holding several CFG branches ([chunks*N, C, h, w], chunk b = `references[b]`'s
    branch) against one `GramReference` per branch: the mean of the per-chunk losses (= the mean over all samples)."""

    def __init__(self, references: Sequence[GramReference]):
        self.references = list(references)

    def loss(self, features: torch.Tensor) -> torch.Tensor:
        chunks = features.chunk(len(self.references))
        return torch.stack([r.loss(c) for r, c in zip(self.references, chunks)]).mean()


def temporal_loss(features: torch.Tensor, flows: CyclicFlows, both_directions: bool = False) -> torch.Tensor:
    """Mean over chunks and pairs of the flow-warp residual, with the flows on the feature grid
    (`CyclicFlows.resized`); `features` [chunks*N, C, h, w]. One direction (paper): the adjacent pairs k -> k+1 of
    |(f_{k+1} - warp(f_k, backward[k])) (1 - occ)|. Both directions (code): every cyclic pair, wrap pair N-1 -> 0
    included, of |f_{k+1} - warp(f_k, backward[k])| (1 - occ_bwd) + |f_k - warp(f_{k+1}, forward[k])| (1 - occ_fwd)."""
    return TemporalLoss(flows, features.shape[0] // flows.frames, both_directions)(features)


class TemporalLoss:
    """`temporal_loss` for features of `chunks` CFG chunks along fixed flows: the sampling grids and occlusion
    weights, repeated over the chunks, are made once per optimisation (not once per Adam iteration), and both
    directions' warps run as one grid_sample."""

    def __init__(self, flows: CyclicFlows, chunks: int, both_directions: bool):
        self.frames, self.both_directions = flows.frames, both_directions
        self.pairs = self.frames if both_directions else self.frames - 1
        directions = [(flows.backward, flows.backward_occlusion)]
        if both_directions:
            directions.append((flows.forward, flows.forward_occlusion))
        self.grid = torch.cat([sampling_grid(flow[:self.pairs]).repeat(chunks, 1, 1, 1) for flow, _ in directions])
        self.weight = torch.cat([(1.0 - occlusion[:self.pairs].float()).repeat(chunks, 1, 1, 1)
                                 for _, occlusion in directions])

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        x = features.float().reshape(-1, self.frames, *features.shape[1:])
        earlier = x[:, :self.pairs].reshape(-1, *x.shape[2:])
        later = x.roll(-1, dims=1)[:, :self.pairs].reshape(-1, *x.shape[2:])
        sources, targets = (torch.cat([earlier, later]), torch.cat([later, earlier])) if self.both_directions \
            else (earlier, later)
        warped = F.grid_sample(sources, self.grid.to(sources.device), mode="bilinear", padding_mode="zeros",
                               align_corners=True)
        residual = ((targets - warped) * self.weight.to(sources.device)).abs()
        # both directions: the mean of their sum over the pairs = twice the mean over both sets of residuals
        return residual.mean() * (2 if self.both_directions else 1)


def channel_statistics(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and (unbiased) std over the spatial dims, [B, C, 1, 1] each."""
    flat = x.float().flatten(2)
    correction = 1 if flat.shape[2] > 1 else 0
    return flat.mean(dim=2)[..., None, None], flat.std(dim=2, correction=correction)[..., None, None]


def restore_statistics(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """AdaIN of `x` to the per-sample, per-channel mean and std of `reference` (exactly, up to float rounding)."""
    mean, std = channel_statistics(x)
    target_mean, target_std = channel_statistics(reference)
    return (x.float() - mean) / std.clamp_min(torch.finfo(torch.float32).tiny) * target_std + target_mean


@dataclass
class OptimizationReport:
    spatial_before: Optional[float]
    spatial_after: Optional[float]
    temporal_before: Optional[float]
    temporal_after: Optional[float]


def _losses(x, gram_reference, temporal_term: Optional[TemporalLoss], form: LossForm):
    spatial = None if gram_reference is None else form.spatial_weight * gram_reference.loss(x)
    temporal = None if temporal_term is None else form.temporal_weight * temporal_term(x)
    return spatial, temporal


def _objective(terms) -> torch.Tensor:
    return sum(term for term in terms if term is not None)


def _keep_better(x, loss, best, best_loss):
    """The iterate with the lower objective, chosen on the device (no sync per iteration)."""
    better = loss.detach() < best_loss
    return torch.where(better, x.detach(), best), torch.minimum(loss.detach(), best_loss)


def optimize_feature(feature: torch.Tensor, gram_reference=None,
                     flows: Optional[CyclicFlows] = None, iterations: int = ITERATIONS,
                     lr: float = LEARNING_RATE, form: str = DEFAULT_FORM) -> Tuple[torch.Tensor, OptimizationReport]:
    """Optimise one layer's feature [chunks*N, C, h, w] with Adam for `iterations` steps against the spatial loss
    (iff `gram_reference`: a `GramReference` or `BranchGramReference`, made with this form's Gram distance) and
    the temporal loss (iff `flows`, any resolution: resized here), in the loss `form` ("code" / "paper", see the
    module doc), then restore its original per-channel statistics. Returns the new feature (same dtype and
    device; a normal tensor even when called under inference mode) and the weighted losses of the input and of
    the returned feature. Works inside torch.inference_mode."""
    if iterations < 0:
        raise ValueError(f"feature optimisation iterations must be >= 0, got {iterations}")
    if lr <= 0:
        raise ValueError(f"feature optimisation learning rate must be positive, got {lr}")
    if form not in LOSS_FORMS:
        raise ValueError(f"feature optimisation loss form must be one of {tuple(LOSS_FORMS)}, got {form!r}")
    if (gram_reference is None and flows is None) or iterations == 0:
        return feature.detach().clone(), OptimizationReport(None, None, None, None)
    loss_form = LOSS_FORMS[form]
    with torch.inference_mode(False), torch.enable_grad():
        original = feature.detach().clone().float()
        temporal_term = None
        if flows is not None:
            temporal_term = TemporalLoss(flows.resized(tuple(feature.shape[-2:])),  # made here: normal tensors
                                         feature.shape[0] // flows.frames, loss_form.temporal_both_directions)
        x = original.clone().requires_grad_(True)
        before = _losses(x.detach(), gram_reference, temporal_term, loss_form)
        optimizer = torch.optim.Adam([x], lr=lr)
        best, best_loss = original, _objective(before)
        for _ in range(iterations):
            optimizer.zero_grad(set_to_none=True)
            loss = _objective(_losses(x, gram_reference, temporal_term, loss_form))
            if loss_form.keep_best:
                best, best_loss = _keep_better(x, loss, best, best_loss)
            loss.backward()
            optimizer.step()
        result = x.detach()
        if loss_form.keep_best:
            final = _objective(_losses(result, gram_reference, temporal_term, loss_form))
            result, _ = _keep_better(result, final, best, best_loss)
        optimized = restore_statistics(result, original)
        after = _losses(optimized, gram_reference, temporal_term, loss_form)
    report = OptimizationReport(*(None if value is None else float(value)
                                  for value in (before[0], after[0], before[1], after[1])))
    return optimized.to(feature.dtype), report


@dataclass
class LayerMemory:
    shape: Tuple[int, int, int]
    form: str
    reference_bytes: int
    working_bytes: int


def feature_optimization_memory(layer_shapes: Sequence[Tuple[int, int, int]], frames: int, chunks: int = 2,
                                form: str = "auto",
                                distance: str = LOSS_FORMS[DEFAULT_FORM].gram_distance) -> List[LayerMemory]:
    """Estimated memory of feature optimisation per layer (C, h, w) for a batch of `frames` and `chunks` CFG
    chunks with the Gram `distance` of the loss form: the Gram reference kept for the batch, and the working set of one iteration (the spatial loss's
    products plus the feature, its gradient, Adam's two moments, the normalised copy and the warps: about 8
    feature-sized float32 tensors). Layers are optimised one at a time, so the peak is the largest working set."""
    if form not in GRAM_FORMS:
        raise ValueError(f"Gram form must be one of {GRAM_FORMS}, got {form!r}")
    samples = frames * chunks
    report = []
    for channels, h, w in layer_shapes:
        tokens = h * w
        chosen = choose_gram_form(channels, tokens, samples, distance) if form == "auto" else form
        sizes = gram_form_bytes(channels, tokens, samples)[chosen]
        feature_bytes = samples * channels * tokens * FLOAT_BYTES
        report.append(LayerMemory((channels, h, w), chosen, sizes["reference"], sizes["working"] + 8 * feature_bytes))
    return report


def memory_totals(report: Sequence[LayerMemory]) -> Tuple[int, int]:
    """(bytes of the Gram references kept for the whole batch, peak working bytes of one layer's optimisation)."""
    return sum(r.reference_bytes for r in report), max((r.working_bytes for r in report), default=0)
