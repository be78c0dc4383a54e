"""Why this token: the logit difference between two candidate tokens split exactly into the parts of the
model that wrote it, the MLP neurons behind a layer's part, and the layer where the model committed.

Direct logit attribution. The residual stream leaving the last block at position p is a sum of parts,

    r = embed + pos_embed + sum over layers l of (sum over heads h of z[l, h] W_O[l, h] + b_O[l] + mlp_out[l])

and the final layer norm is linear in r once its scale sigma (measured on the actual r of the forward
pass) is fixed: ln_f(r) = gamma * (r - mean(r)) / sigma + beta. So the logit difference between tokens a
and b, ln_f(r) . (W_U[a] - W_U[b]), is exactly the sum of c . u over the parts c, with
u = centred(gamma * (W_U[a] - W_U[b]) / sigma), plus beta . (W_U[a] - W_U[b]). A head's part goes
through its slice of the output projection; an MLP layer's part splits again over its neurons:
activation x (the neuron's output direction . u), plus the layer's output bias.

Everything is recomputed from what a recording session keeps (the residual stream of each position
and the KV cache): attention rows from the keys, heads' outputs from the cached values, MLP
activations from the residual stream between attention and MLP. With interventions, their edits of
z, attn_out, mlp.pre, mlp.post and mlp_out are made here too; edits of the residual stream itself
(patching, steering) show up as `rest`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .generation import GenerationSession
from .sampling import SamplingConfig, Stage, cdf_slice, draw_with, sampler_stages, uniform
from .trace import Trace


def as_session(model, trace: Trace, tokenizer=None) -> GenerationSession:
    """A recording session that has read a trace's tokens: the functions of this module take a session, or a
    trace with `model=` (converted here, one forward pass each time: convert once to call them often)."""
    if len(trace) >= model.cfg.n_positions:
        raise ValueError(f"the trace has {len(trace)} tokens; a session over it holds at most {model.cfg.n_positions - 1}")
    session = GenerationSession(model, tokenizer, trace.tokens.tolist(), record=True)
    session.read()
    return session


def _source(source: GenerationSession | Trace, model) -> GenerationSession:
    if isinstance(source, GenerationSession):
        return source
    if isinstance(source, Trace):
        if model is None:
            raise ValueError("a trace holds no model: pass the one that made it as model=")
        return as_session(model, source)
    raise TypeError(f"expected a GenerationSession or a Trace, got {type(source).__name__}")


@dataclass
class Attribution:
    """The logit difference `logit[target] - logit[baseline]` after reading `position`, split into parts."""

    position: int
    target: int
    baseline: int
    logit_diff: float  # the forward pass's own logit difference
    embed: float  # token embedding
    pos_embed: float  # position embedding
    heads: np.ndarray  # [layer, head] each head's output through its slice of the output projection
    attn_bias: np.ndarray  # [layer] the attention output projection's bias
    mlp: np.ndarray  # [layer] each MLP layer's output (its output bias included)
    ln_bias: float  # the final layer norm's bias
    rest: float  # logit_diff - the sum of the parts: rounding, or edits of the residual stream itself

    @property
    def parts_sum(self) -> float:
        return float(self.embed + self.pos_embed + self.heads.sum() + self.attn_bias.sum() + self.mlp.sum() + self.ln_bias)

    def top(self, n: int = 5) -> list[tuple[str, float]]:
        """The `n` parts with the largest effect (either sign), as ("head 3.1", value), ("MLP 2", value), ..."""
        parts = [("token embedding", self.embed), ("position embedding", self.pos_embed)]
        parts += [(f"head {layer}.{head}", float(v)) for (layer, head), v in np.ndenumerate(self.heads)]
        parts += [(f"MLP {layer}", float(v)) for layer, v in enumerate(self.mlp)]
        return sorted(parts, key=lambda kv: -abs(kv[1]))[:n]


@dataclass
class Neurons:
    """An MLP layer's part of an attribution split over its neurons, at one position."""

    layer: int
    activation: np.ndarray  # [d_mlp] after the GELU (and any intervention)
    contribution: np.ndarray  # [d_mlp] to the logit difference; sums with `bias` to the layer's part
    bias: float

    def top_contributors(self, n: int = 8) -> np.ndarray:
        return np.argsort(-np.abs(self.contribution), kind="stable")[:n]

    def most_active(self, n: int = 8) -> np.ndarray:
        return np.argsort(-self.activation, kind="stable")[:n]


class _Parts:
    """The per-layer pieces of one position, recomputed from a recording session."""

    def __init__(self, session: GenerationSession, position: int) -> None:
        if not session.record:
            raise ValueError("attribution needs a recording session (record=True)")
        n = len(session.records)
        if not 0 <= position < n:
            raise ValueError(f"position must be in [0, {n}), got {position}")
        self.session, self.position = session, position
        model = session.model
        self.resid = torch.from_numpy(session.records.resid[position]).to(model.device, model.wte.weight.dtype)  # [layer + 1, C]

    @torch.no_grad()
    def head_outputs(self, layer: int) -> torch.Tensor:
        """`[head, d_head]` z of every head at the position: its attention row times the cached values."""
        s, p = self.session, self.position
        row = torch.from_numpy(s.attention_pattern(layer, p, p + 1)[:, 0]).to(self.resid)  # [head, p + 1]
        z = torch.einsum("hk,hkd->hd", row, s._kv.values(layer)[0, :, : p + 1])
        return s.plan.apply(f"blocks.{layer}.attn.z", z[None, :, None], p)[0, :, 0]

    @torch.no_grad()
    def attn_out(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        proj = self.session.model.blocks[layer].attn.c_proj
        out = F.linear(z.reshape(-1), proj.weight, proj.bias)
        return self.session.plan.apply(f"blocks.{layer}.attn_out", out[None, None], self.position)[0, 0]

    @torch.no_grad()
    def mlp_post(self, layer: int, attn_out: torch.Tensor) -> torch.Tensor:
        """`[d_mlp]` the MLP's activations, from the stream between attention and MLP."""
        block, plan, p = self.session.model.blocks[layer], self.session.plan, self.position
        mid = plan.apply(f"blocks.{layer}.resid_mid", (self.resid[layer] + attn_out)[None, None], p)[0, 0]
        pre = plan.apply(f"blocks.{layer}.mlp.pre", block.mlp.c_fc(block.ln_2(mid))[None, None], p)
        return plan.apply(f"blocks.{layer}.mlp.post", F.gelu(pre, approximate="tanh"), p)[0, 0]

    @torch.no_grad()
    def mlp_out(self, layer: int, post: torch.Tensor) -> torch.Tensor:
        out = self.session.model.blocks[layer].mlp.c_proj(post)
        return self.session.plan.apply(f"blocks.{layer}.mlp_out", out[None, None], self.position)[0, 0]

    @torch.no_grad()
    def direction(self, target: int, baseline: int) -> tuple[torch.Tensor, float, float]:
        """(u `[C]`, the ln_f bias's part, the forward pass's logit difference) for target - baseline."""
        model = self.session.model
        ln = model.ln_f
        r = self.resid[-1]
        sigma = torch.sqrt(r.var(unbiased=False) + ln.eps)
        d = model.wte.weight[target] - model.wte.weight[baseline]
        g = ln.weight * d / sigma
        u = g - g.mean()
        logits = model.unembed(ln(r)).float()
        return u, float(ln.bias @ d), float(logits[target] - logits[baseline])


def _check_token(model, name: str, token: int) -> int:
    if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < model.cfg.vocab_size:
        raise ValueError(f"{name} must be a token id in [0, {model.cfg.vocab_size}), got {token!r}")
    return token


def runner_up(session: GenerationSession, position: int, target: int) -> int:
    """The token other than `target` that the model found likeliest after `position` (the default comparison)."""
    probs = session.model_distribution(position)
    top = torch.topk(probs, 2).indices.tolist()
    return top[1] if top[0] == target else top[0]


@torch.no_grad()
def attribution(session: GenerationSession | Trace, position: int, target: int, baseline: int | None = None, *,
                model=None) -> Attribution:
    """Split `logit[target] - logit[baseline]` after reading `position` into its parts (see the module
    docstring); `baseline` defaults to the runner-up (`runner_up`)."""
    session = _source(session, model)
    parts = _Parts(session, position)
    model = session.model
    target = _check_token(model, "target", target)
    baseline = runner_up(session, position, target) if baseline is None else _check_token(model, "baseline", baseline)
    if baseline == target:
        raise ValueError("the comparison token must differ from the target")
    u, ln_bias, logit_diff = parts.direction(target, baseline)
    cfg = model.cfg
    heads = np.zeros((cfg.n_layer, cfg.n_head))
    attn_bias, mlp = np.zeros(cfg.n_layer), np.zeros(cfg.n_layer)
    for layer in range(cfg.n_layer):
        attn = model.blocks[layer].attn
        z = parts.head_outputs(layer)  # [head, d_head]
        per_head = (attn.c_proj.weight.T @ u).view(cfg.n_head, cfg.d_head)  # W_O^T u, split by head
        heads[layer] = (z * per_head).sum(-1).double().cpu().numpy()
        attn_bias[layer] = float(attn.c_proj.bias @ u)
        out = parts.attn_out(layer, z)
        mlp[layer] = float(parts.mlp_out(layer, parts.mlp_post(layer, out)) @ u)
    rec = session.records
    embed = float(torch.from_numpy(rec.embed[position]).to(u) @ u)
    pos_embed = float(torch.from_numpy(rec.pos_embed[position]).to(u) @ u)
    a = Attribution(position, target, baseline, logit_diff, embed, pos_embed, heads, attn_bias, mlp, ln_bias, 0.0)
    a.rest = logit_diff - a.parts_sum
    return a


@torch.no_grad()
def neuron_contributions(session: GenerationSession | Trace, position: int, layer: int, target: int,
                         baseline: int | None = None, *, model=None) -> Neurons:
    """One MLP layer's part of `attribution`, neuron by neuron."""
    session = _source(session, model)
    parts = _Parts(session, position)
    model = session.model
    if not 0 <= layer < model.cfg.n_layer:
        raise ValueError(f"layer must be in [0, {model.cfg.n_layer}), got {layer}")
    target = _check_token(model, "target", target)
    baseline = runner_up(session, position, target) if baseline is None else _check_token(model, "baseline", baseline)
    u, _, _ = parts.direction(target, baseline)
    post = parts.mlp_post(layer, parts.attn_out(layer, parts.head_outputs(layer)))
    proj = model.blocks[layer].mlp.c_proj
    contribution = post * (proj.weight.T @ u)  # [d_mlp]
    return Neurons(layer, post.double().cpu().numpy(), contribution.double().cpu().numpy(), float(proj.bias @ u))


@torch.no_grad()
def neuron_tokens(model_or_session, layer: int, neuron: int | list[int], n: int = 5):
    """The tokens whose logits a neuron's output direction raises most and lowers most, read through the
    final layer norm's scale and the unembedding: (promoted ids, suppressed ids); for a list of neurons, one
    such pair each (the unembedding is read once for all of them). Needs only the model (or a session)."""
    model = getattr(model_or_session, "model", model_or_session)
    neurons = [neuron] if isinstance(neuron, int) else list(neuron)
    if not 0 <= layer < model.cfg.n_layer or not all(0 <= i < model.cfg.d_mlp for i in neurons):
        raise ValueError(f"no neuron {neuron} in layer {layer}")
    w = model.blocks[layer].mlp.c_proj.weight[:, neurons]  # [C, k] output directions
    directions = (w - w.mean(0)) * model.ln_f.weight[:, None]
    logits = (model.wte.weight @ directions).T  # [k, vocab]
    pairs = [(torch.topk(row, n).indices.tolist(), torch.topk(-row, n).indices.tolist()) for row in logits]
    return pairs[0] if isinstance(neuron, int) else pairs


@dataclass
class Commitment:
    """For positions start..end-1: the layer from which the logit lens's top guess is the model's final
    prediction and stays so (`layer[i]`; n_layer means only the last block gets it), the final token's
    rank at each layer and each layer's entropy."""

    start: int
    layer: np.ndarray  # [n] int: 0 = already the embeddings' guess
    rank: np.ndarray  # [layer + 1, n] int, 1 = the top guess
    entropy: np.ndarray  # [layer + 1, n] nats
    final: np.ndarray  # [n] the final top token's id


@torch.no_grad()
def commitment(session: GenerationSession | Trace, start: int, end: int, *, model=None) -> Commitment:
    """Read each position's residual stream at every layer through ln_f and the unembedding (the logit lens)."""
    session = _source(session, model)
    n = len(session.records)
    if not 0 <= start < end <= n:
        raise ValueError(f"commitment needs 0 <= start < end <= {n}, got {start}, {end}")
    model = session.model
    resid = session.capture.recorded_resid(range(start, end))  # [layer + 1, n, C]
    L1, m = resid.shape[0], resid.shape[1]
    normed = model.ln_f(resid)  # the last row is the model's own final layer norm output
    ranks = np.zeros((L1, m), dtype=np.int64)
    entropy = np.zeros((L1, m))
    logits_final = model.unembed(normed[-1]).float()  # [n, vocab]
    final = logits_final.argmax(-1)
    for layer in range(L1):
        logits = model.unembed(normed[layer]).float()
        chosen = logits.gather(1, final[:, None])
        ranks[layer] = ((logits > chosen).sum(-1) + 1).cpu().numpy()
        entropy[layer] = torch.special.entr(torch.softmax(logits, -1)).sum(-1, dtype=torch.float64).cpu().numpy()
    return Commitment(start, _settled(ranks == 1), ranks, entropy, final.cpu().numpy())


def _settled(agrees: np.ndarray) -> np.ndarray:
    """`[layer + 1, n]` whether each layer's top guess is the final one -> `[n]` the first layer of the last
    run of agreeing layers (the layer from which the guess stays final)."""
    last_disagree = np.where(~agrees, np.arange(agrees.shape[0])[:, None], -1).max(axis=0)
    return last_disagree + 1


def commitment_layers(session: GenerationSession | Trace, start: int, end: int) -> np.ndarray:
    """`[end - start]` for positions start..end-1: `Commitment.layer`, from the session's cached logit lens
    (top guess per layer; each position is read through the unembedding once), or from a trace's own lens."""
    if isinstance(session, Trace):
        if not 0 <= start < end <= len(session):
            raise ValueError(f"commitment needs 0 <= start < end <= {len(session)}, got {start}, {end}")
        top = session.lens_ids[:, start:end, 0]
        return _settled(top == top[-1:])
    ids, _ = session.logit_lens(start, end, top_n=1)  # [layer + 1, n, 1]
    top = ids[:, :, 0]
    return _settled(top == top[-1:])


@dataclass
class Draw:
    """How the token at `position` came out of the sampler: the stages of its distribution (read after
    position - 1), the uniform number u the draw used and the slice of the final cumulative distribution
    it fell in (None where nothing was drawn: greedy, forced, or a token of the prompt or of a trace)."""

    position: int
    token: int
    method: str  # "sampled", "greedy", "forced" or "read" (a prompt's or a trace's token)
    config: SamplingConfig  # the settings the stages are computed with (the step's own for a generated token)
    stages: list[Stage]
    u: float | None
    slice: tuple[float, float] | None
    logits: torch.Tensor  # [vocab] the model's logits after position - 1
    previous: list[int]  # the tokens the repetition penalty saw

    def what_if(self, config: SamplingConfig) -> int:
        """The token the same u picks under other settings (the likeliest one with temperature 0), without
        running the model again; for a token that was not drawn, u is the one its position's draw would use."""
        final = sampler_stages(self.logits, self.previous, config)[-1].probs
        return draw_with(final, uniform(config.seed, self.position) if self.u is None else self.u)


@torch.no_grad()
def sampler_anatomy(session: GenerationSession | Trace, position: int, config: SamplingConfig | None = None, *,
                    model=None) -> Draw:
    """The sampler's stages for the token at `position` >= 1 (`sampling.sampler_stages`). A generated token
    is explained with the settings it was drawn with; any other with `config` (default: the session's)."""
    session = _source(session, model)
    n = len(session.ids)
    if position == 0:
        raise ValueError("the first token was not drawn from anything: give a position in [1, n)")
    if not 1 <= position < n:
        raise ValueError(f"position must be in [1, {n}), got {position}")
    n_prompt = len(session.prompt_ids)
    step = session.steps[position - n_prompt] if position >= n_prompt else None
    cfg = (step.config or session.config) if step is not None else (config or session.config)
    logits = session.capture.logits_at(position - 1)
    previous = session.ids[:position]
    stages = sampler_stages(logits, previous, cfg)
    token = session.ids[position]
    method = step.method if step is not None else "read"
    u = uniform(cfg.seed, position) if method == "sampled" else None
    where = cdf_slice(stages[-1].probs, token) if u is not None else None
    return Draw(position, token, method, cfg, stages, u, where, logits, previous)
