"""Gradient projection ("Beyond Memorization: Gradient Projection Enables Selective Learning in Diffusion Models",
arXiv 2512.11194), as a post-hoc fine-tune on the shared loop of `memprune.finetune`.

The paper projects every gradient update onto the orthogonal complement of a sensitive concept's text-embedding
subspace during training, so the weights that read the text cannot learn anything along those directions. Here:

- **Subspace.** U (d_text x k) = the top right singular vectors of X, the memorized captions' text-encoder
  outputs as the denoiser sees them (`encoder_hidden_states`, captured from the pipeline itself, so SDXL's
  concatenated two-encoder states work too), token vectors stacked as rows (N tokens x d_text). k is the smallest
  rank whose squared singular values hold `energy` (default 0.97, GPM's threshold, exposed as --energy) of the
  total. SVD in float64.
- **Which tokens.** `tokens="prompt"` (default): the caption's own tokens and its end-of-text token (positions
  1 .. EOS), found from the pipeline's tokenizer attention mask. Not the start token: CLIP's causal attention
  makes its output identical for every prompt, so including it would freeze K/V for every prompt alike. Not
  the padding positions, by default: they come after EOS and only summarise the same caption again (we did not
  measure how much they add). `tokens="all"` takes every position but the start token (cross-attention reads
  the padding too).
- **Centring.** None by default (`center=False`): as GPM and the public re-implementation (CUIG's
  P = I - C(CᵀC)⁻¹Cᵀ) do, the subspace includes the memorized captions' mean direction. `center=True` removes the
  mean first (only the directions in which memorized captions differ from each other).
- **Which weights.** Every `to_k`/`to_v` weight W (out x d_text) of a diffusers cross-`Attention` (found by type).
  Its gradient G becomes G - G U Uᵀ, so G·U = 0. With `--params unet` the other denoiser parameters train
  unprojected (only the K/V weights read text; the constraint is about those). Biases, where a K/V projection has
  one, train unprojected (SD has none).
- **Adam.** The paper projects the gradient. Adam divides each coordinate by its own running scale, which
  moves the step back out of the complement, so the gradient projection alone does not give ΔW·U = 0.
  With `project_step=True` (default) each parameter step is projected too, after the optimiser
  (W ← W₀ + (W - W₀)(I - U Uᵀ)). The total change then satisfies ‖ΔW·U‖ ≈ 0 up to float rounding. The test
  checks it, and checks that the gradient projection alone leaks under Adam.
- **Data.** Retain data only (the shared loop's generated retain latents, or --retain-images); the memorized
  captions are used for U and are refused as retain captions.
- **Selective learning (the paper's setting).** `--data FOLDER_OR_CSV --protect FILE`: the run learns a mixture
  of image/caption pairs that *contains* the images to protect (typically duplicated, the way training sets
  repeat images), and U is built from the --protect captions instead of --memorized. The protected rows are
  those of --data whose caption is a --protect caption (after prompts.normalise_caption); they are learned
  with every K/V update projected off U, so their captions' keys and values never move. `check_protected`
  refuses the overlaps that are not the point: --protect captions among generated retain captions (data the
  run is meant to learn freely), and a --data whose every caption is protected (nothing left to learn).
  scripts/gradproj_scenario.py runs the paper's three arms (projected, plain, data-filtered) on the testbed.

What this means post hoc: with ΔW·U = 0, the keys and values that the fine-tuned model computes for the memorized
captions' tokens are unchanged (exactly for the rank-k part, approximately for the rest of their energy). The
method therefore cannot *unlearn* a memorized caption's K/V response. Anything it changes in memorized generations
comes from the 1 - energy residual, from the non-K/V parameters under --params unet, and from what the retain
fine-tune changes for other tokens. In the paper, the projection is applied while the model is trained on data
that contains the concept. Here it is applied to an already-memorizing model, which the seed paper does not
evaluate. The plain control (`--method plain`, the same steps and data without projection) separates the two.

Measured on the embedded testbed (text width 64, 50 memorized captions, 170 caption+EOS token vectors): the
default subspace has rank 15 (28 centred). The retain captions (128 of general_train.csv) are not orthogonal to it.
90.3 % of their token energy lies inside U uncentred (64.1 % centred; 89.3 % / 74.4 % with tokens="all"). The
projected fine-tune can therefore only change the K/V response to the remaining part of every prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..conditioning import encode_conditioning
from ..errors import MemPruneError
from ..finetune import FinetuneHooks, FinetuneResult, FinetuneSettings, RetainData, cross_attention_kv, run_finetune
from .base import MethodInfo

METHOD = MethodInfo(
    name="gradproj", kind="finetune",
    summary="Fine-tune cross-attention K/V on retain data with every update projected off the memorized captions' "
            "text-embedding subspace.",
    reference="Gradient projection, 'Beyond Memorization: Gradient Projection Enables Selective Learning in "
              "Diffusion Models', arXiv 2512.11194",
)
TOKEN_CHOICES = ("prompt", "all")


@dataclass
class GradProjSettings:
    energy: float = 0.97  # share of the squared singular values the subspace keeps
    tokens: str = "prompt"  # "prompt": caption tokens + EOS; "all": every position but BOS
    center: bool = False  # subtract the mean token vector before the SVD
    project_step: bool = True  # also project each optimiser step (Adam leaks otherwise)

    def __post_init__(self):
        if not 0 < self.energy <= 1:
            raise MemPruneError(f"--energy must be in (0, 1], got {self.energy}.")
        if self.tokens not in TOKEN_CHOICES:
            raise MemPruneError(f"Gradient projection tokens must be one of {', '.join(TOKEN_CHOICES)}, "
                                f"got '{self.tokens}'.")


def default_settings() -> GradProjSettings:
    return GradProjSettings()


def settings_from_options(options: dict) -> GradProjSettings:
    """GradProjSettings from `memprune finetune`'s options (--energy); refuses --anchors, which only DoCo uses."""
    if options.get("anchors") is not None:
        raise MemPruneError("--anchors is used by --method doco only.")
    return GradProjSettings(energy=options.get("energy", GradProjSettings.energy))


def check_protected(protect: list[str], learned: list[str], from_data: bool, option: str = "--data") -> list[str]:
    """Refuse --protect captions that overlap the learned captions where that is not the point (naming them);
    the notes to print otherwise. `from_data`: the learned captions label images of --data (the mixture, where
    protected captions are expected); else they are generated retain captions (where they are not)."""
    from ..prompts import overlapping_captions

    if not protect:
        raise MemPruneError("The --protect file holds no caption: give the captions whose images must not be learned.")
    rows = overlapping_captions(learned, protect)
    named = list(dict.fromkeys(learned[i] for i in rows))
    listed = "; ".join(f"'{p}'" for p in named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3 else "")
    if not from_data:
        if rows:
            raise MemPruneError(f"{len(named)} retain captions are also --protect captions ({listed}): the retain "
                                "data is learned freely, so protecting its captions is not the point; remove them "
                                "from one of the files (or give the mixture with --data).")
        return []
    if len(rows) == len(learned):
        raise MemPruneError(f"Every caption of {option} is a --protect caption ({listed}): nothing is left to learn; "
                            "--data must also hold images to learn.")
    if not rows:
        return [f"no caption of {option} is a --protect caption: the run learns no protected image, so the "
                "projection only constrains how the other captions are learned."]
    return [f"{len(rows)} of the {len(learned)} {option} rows ({len(named)} captions) are protected: learned with "
            "every K/V update projected off the --protect captions' subspace."]


def subspace(vectors: torch.Tensor, energy: float = 0.97, center: bool = False) -> tuple[torch.Tensor, float]:
    """Orthonormal basis U (d x k) of the top right singular vectors of `vectors` (N x d) holding `energy` of the
    squared singular values; and the share they hold."""
    x = vectors.detach().double()
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    power = s.square()
    total = float(power.sum())
    if total == 0:
        raise MemPruneError("The memorized captions' text embeddings are all zero: "
                            "there is no subspace to project off.")
    cumulative = torch.cumsum(power, 0) / total
    k = int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype) - 1e-12)) + 1
    k = min(k, len(s))
    return vh[:k].T.contiguous(), float(cumulative[k - 1])


def project_off(matrix: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """M - M U Uᵀ: the rows of M with their components along span(U) removed (so the result times U is 0)."""
    basis = basis.to(matrix.device, matrix.dtype)
    return matrix - (matrix @ basis) @ basis.T


def token_vectors(pipe, prompts: list[str], tokens: str = "prompt") -> torch.Tensor:
    """The denoiser's text conditioning of `prompts`, the chosen token positions stacked as rows (N x d)."""
    states = encode_conditioning(pipe, prompts).cond  # (n, T, d)
    lengths = None
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokens == "prompt":
        if tokenizer is None:
            raise MemPruneError("The pipeline has no tokenizer to find caption tokens: use tokens='all'.")
        encoded = tokenizer(list(prompts), padding="max_length", max_length=states.shape[1], truncation=True,
                            return_tensors="pt")
        lengths = encoded["attention_mask"].sum(dim=1).tolist()  # BOS + words + EOS
    rows = []
    for index in range(states.shape[0]):
        end = states.shape[1] if lengths is None else int(lengths[index])
        rows.append(states[index, 1:max(end, 2)])
    return torch.cat(rows).float()


class GradProjHooks(FinetuneHooks):
    """Project every K/V weight gradient (and, by default, every step) off span(U)."""

    def __init__(self, basis: torch.Tensor, settings: GradProjSettings):
        self.basis = basis.float()
        self.settings = settings
        self.names: list[str] = []

    def setup(self, loop) -> None:
        kv = cross_attention_kv(loop.net)
        self.names = [f"{name}.weight" for name in kv if f"{name}.weight" in loop.params]
        if not self.names:
            raise MemPruneError("Gradient projection found no trained cross-attention key/value weight.")
        widths = {kv[name.rsplit('.', 1)[0]].in_features for name in self.names}
        if widths != {self.basis.shape[0]}:
            raise MemPruneError(f"Cross-attention K/V weights read {sorted(widths)}-dimensional text but the memorized "
                                f"subspace lives in {self.basis.shape[0]} dimensions: unsupported conditioning.")
        self.basis = self.basis.to(loop.device)

    def transform_gradients(self, loop, grads) -> None:
        for name in self.names:
            grads[name] = project_off(grads[name], self.basis)

    def after_step(self, loop, step) -> None:
        if not self.settings.project_step:
            return
        for name in self.names:
            original = loop.originals[name]
            loop.params[name].copy_(original + project_off(loop.params[name] - original, self.basis))

    def residual(self, delta: dict[str, torch.Tensor]) -> float:
        """max over K/V weights of ‖ΔW U‖_F / ‖ΔW‖_F (0 when nothing changed)."""
        worst = 0.0
        for name in self.names:
            change = delta[name].double()
            norm = float(change.norm())
            if norm > 0:
                worst = max(worst, float((change @ self.basis.cpu().double()).norm()) / norm)
        return worst


def train(pipe, settings: FinetuneSettings, method_settings: GradProjSettings | None = None,
          memorized_prompts: list[str] | None = None, retain: RetainData | None = None, **_) -> FinetuneResult:
    method_settings = method_settings or GradProjSettings()
    if not memorized_prompts:
        raise MemPruneError("Gradient projection needs the memorized captions (--memorized FILE) "
                            "to build its subspace.")
    if retain is None:
        raise MemPruneError("Gradient projection needs retain data to fine-tune on.")
    vectors = token_vectors(pipe, memorized_prompts, method_settings.tokens)
    basis, held = subspace(vectors, method_settings.energy, method_settings.center)
    hooks = GradProjHooks(basis, method_settings)
    delta, history = run_finetune(pipe, settings, retain, hooks, desc=f"gradproj (rank {basis.shape[1]})")
    info = {"subspace_rank": int(basis.shape[1]), "text_dim": int(basis.shape[0]), "energy_held": held,
            "token_vectors": int(vectors.shape[0]), "projected_weights": len(hooks.names),
            "max_relative_residual_dW_U": hooks.residual(delta)}
    return FinetuneResult(delta=delta, history=history, info=info)


def finetune(pipe, settings: FinetuneSettings, **inputs) -> dict[str, torch.Tensor]:
    """The finetune entry point: the weight delta (the pipeline is left unchanged)."""
    return train(pipe, settings, **inputs).delta
