"""The outcome-based sigmoid meta-router: Brainstacks §3.6 (arXiv 2604.01152), shared with training.

It reads the frozen base's hidden states for the prompt (stacks off): a mix of a middle layer and
the last (0.45 / 0.55), layer-normed and averaged over the prompt's tokens, then a small MLP gives
one logit per domain, and one sigmoid per domain (domains are not exclusive: a dose question wants
medical *and* math).
At inference the chat domain gets a floor, a domain at or under the gate threshold is skipped, and
every applied domain runs at weight 1 (`weighting="gate"`), at its probability (the paper's), or
relative to the most probable (`"top"`: that one at 1, the others at p / p_max).
`plan_route` turns a request's route ("auto", "none" or {domain: weight}) into the weights applied
and the reason every other domain stays off. No library has it; it is small enough to read top to
bottom. Its training (outcome discovery, BCE) is training/brainstacks/router_training.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from transformers import DynamicCache

from server.artifacts import ArtifactError, load_with_config, save_with_config
from server.chat.moe_lora import routed

Route = Literal["auto", "none"] | dict[str, float]  # what a request asks for
WEIGHTINGS = ("gate", "probability", "top")
POOLINGS = ("mean", "attention", "projected-attention")
READS = ("template", "text")


@dataclass(frozen=True)
class RouterConfig:
    domains: tuple[str, ...]
    hidden_size: int  # the base model's
    middle_layer: int  # index into the base's hidden_states (0 = embeddings)
    middle_weight: float = 0.45  # the last layer gets the rest
    width: int = 128
    floor_domain: str | None = "chat"  # always applied at least at `floor`
    floor: float = 0.2
    gate_threshold: float = 0.12  # a domain at or under this probability is skipped
    # "gate": an applied domain runs at weight 1; "probability": at its probability, as the paper
    # serves it; "top": the most probable domain at 1, the others at p / p_max. Measured
    # (docs/brainstacks.md): stacks trained on top of earlier domains need "gate" (at probabilities
    # of 0.8-0.95 on the earlier domains, the last domain's exact match fell from 0.60 to 0.17: its
    # stacks learned on top of them at 1); stacks trained on the base alone lose to "probability" at
    # "gate" (the extra domains a gate lets through cost 9 points) but lose under "probability" what
    # a stack below weight 1 forgets. The chat zoo build chooses on validation prompts.
    weighting: str = "gate"
    # "mean": the average over the prompt's tokens. "attention": the router's first design, a learned
    # global query and one query per domain, an MLP on [global, domain] and a learned temperature;
    # routers saved before `pooling` existed are attention routers. Trained on 12 of a task kind's 15
    # training phrasings and asked the other 3 (`training eval router-phrasings`), mean pooling gave
    # 0.999 of domain prompts their own domain alone (worst kind 0.99), attention 0.991 (worst 0.91).
    # "projected-attention": the Brainstacks authors' released router (imported by `training import
    # brainstacks`): tokens projected to `width` and layer-normed, one global and one per-domain
    # query attending over them unscaled, a fusion MLP on [domain, global] with one shared head, and
    # a learned temperature clamped to [0.3, 3].
    pooling: str = "mean"
    # what the router reads: "template", the prompt as the model's chat template renders it;
    # "text", the last user turn's text alone, no special tokens, at most `max_tokens` tokens
    reads: str = "template"
    max_tokens: int | None = None


class MetaRouter(nn.Module):
    def __init__(self, config: RouterConfig):
        super().__init__()
        if config.weighting not in WEIGHTINGS:
            raise ValueError(f"router weighting must be one of {WEIGHTINGS}, not {config.weighting!r}")
        if config.pooling not in POOLINGS:
            raise ValueError(f"router pooling must be one of {POOLINGS}, not {config.pooling!r}")
        if config.reads not in READS:
            raise ValueError(f"router reads must be one of {READS}, not {config.reads!r}")
        self.config = config
        d, n = config.hidden_size, len(config.domains)
        if config.pooling == "projected-attention":
            self._projected_attention(d, config.width, n)
            return
        self.norm = nn.LayerNorm(d)
        if config.pooling == "mean":
            self.mlp = nn.Sequential(nn.Linear(d, config.width), nn.GELU(), nn.Linear(config.width, n))
            return
        self.query = nn.Parameter(torch.randn(d) * 0.02)
        self.domain_queries = nn.Parameter(torch.randn(n, d) * 0.02)
        self.mlp = nn.Sequential(nn.Linear(2 * d, config.width), nn.GELU(), nn.Linear(config.width, 1))
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def _projected_attention(self, d: int, width: int, n: int) -> None:
        """The authors' layers, named as their checkpoints name them (an import copies them 1:1)."""
        self.token_proj, self.token_ln = nn.Linear(d, width), nn.LayerNorm(width)
        self.domain_queries = nn.Parameter(torch.randn(n, width) * 0.02)
        self.global_query = nn.Parameter(torch.randn(width) * 0.02)
        self.ctx_ln, self.global_ln = nn.LayerNorm(width), nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(2 * width, width), nn.GELU(), nn.Dropout(0.1), nn.LayerNorm(width),
                                nn.Linear(width, width), nn.GELU(), nn.Dropout(0.1))
        self.out = nn.Linear(width, 1)
        self.log_temperature = nn.Parameter(torch.zeros(1))

    def _projected_attention_logits(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.token_ln(self.token_proj(states.float()))  # [batch, tokens, width]
        pad = attention_mask[:, None, :] == 0
        queries = torch.cat([self.global_query[None], self.domain_queries])  # [1 + n, width]
        scores = torch.einsum("btw,qw->bqt", x, queries)  # no 1/sqrt(width), as trained
        pooled = scores.masked_fill(pad, -1e9).softmax(-1) @ x  # [batch, 1 + n, width]
        domains, overall = self.ctx_ln(pooled[:, 1:]), self.global_ln(pooled[:, :1])
        fused = self.ff(torch.cat([domains, overall.expand_as(domains)], dim=-1))
        return self.out(fused).squeeze(-1) / self.log_temperature.exp().clamp(0.3, 3.0)

    def features(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        c = self.config
        return c.middle_weight * hidden_states[c.middle_layer] + (1 - c.middle_weight) * hidden_states[-1]

    @torch.no_grad()
    def base_features(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What the router reads: the frozen base's mixed hidden states for a prompt, every stack off."""
        with routed(model, {}):  # the decoder alone: the LM head's logits would be a fifth of the cost, unused
            hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                      output_hidden_states=True).hidden_states
        return self.features(hidden)

    @torch.no_grad()
    def probabilities(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One sigmoid per domain, [batch, domains]."""
        return torch.sigmoid(self(self.base_features(model, input_ids, attention_mask), attention_mask))

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [batch, domains] from mixed hidden states [batch, tokens, d]."""
        if self.config.pooling == "projected-attention":
            return self._projected_attention_logits(states, attention_mask)
        h = self.norm(states.float())
        if self.config.pooling == "mean":
            tokens = attention_mask[..., None].to(h.dtype)
            return self.mlp((h * tokens).sum(1) / tokens.sum(1).clamp(min=1))
        scale = 1 / math.sqrt(h.shape[-1])
        pad = attention_mask[:, None, :] == 0
        queries = torch.cat([self.query[None], self.domain_queries])  # [1 + n, d]
        scores = torch.einsum("btd,qd->bqt", h, queries) * scale
        pooled = scores.masked_fill(pad, float("-inf")).softmax(-1) @ h  # [batch, 1 + n, d]
        n = len(self.config.domains)
        pairs = torch.cat([pooled[:, :1].expand(-1, n, -1), pooled[:, 1:]], dim=-1)
        return self.mlp(pairs).squeeze(-1) / self.log_temperature.exp()

    def route(self, probabilities: torch.Tensor) -> tuple[dict[str, float], dict[str, str]]:
        """One prompt's probabilities -> (weights applied, domains gated off and why)."""
        c = self.config
        applied, gated = {}, {}
        for domain, p in zip(c.domains, probabilities.tolist()):
            if domain == c.floor_domain and p < c.floor:
                applied[domain] = c.floor
            elif p <= c.gate_threshold:
                gated[domain] = f"router probability {p:.3f} <= gate threshold {c.gate_threshold}"
            else:
                applied[domain] = p
        top = max(applied.values(), default=1.0)
        weights = {d: 1.0 if c.weighting == "gate" else round(p / top if c.weighting == "top" else p, 6)
                   for d, p in applied.items()}
        return weights, gated


class RouterPass:
    """The meta-router's read of one prompt, in parts that the chat engine interleaves with other
    requests' decode steps: the frozen base (stacks off) over the prompt chunk by chunk with a KV
    cache, the router's mixed hidden states kept, the probabilities once every token is read. The
    same numbers as one pass over the whole prompt, up to float rounding (the same bits in one part)."""

    def __init__(self, router: MetaRouter, model: nn.Module, input_ids: torch.Tensor):
        self.router, self.model, self.input_ids = router, model, input_ids
        self.read = 0
        self.seconds = 0.0  # the passes' own time
        self._cache = None
        self._states: list[torch.Tensor] = []

    @property
    def remaining(self) -> int:
        return self.input_ids.shape[1] - self.read

    @torch.no_grad()
    def advance(self, budget: int | None = None) -> int:
        """Read up to `budget` more tokens (the rest: None); the tokens read."""
        started = time.perf_counter()
        end = self.input_ids.shape[1] if budget is None else min(self.input_ids.shape[1], self.read + budget)
        ids = self.input_ids[:, self.read:end]
        mask = torch.ones(1, end, dtype=torch.long, device=ids.device)
        with routed(self.model, {}):  # the decoder alone: the LM head's logits would be a fifth of the cost, unused
            out = self.model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=True,
                                        cache=self._cache or DynamicCache(config=self.model.config))
        self._cache = out.cache
        self._states.append(self.router.features(out.hidden_states))
        done, self.read = end - self.read, end
        if not self.remaining:
            self._cache = None  # the router has what it reads: the base's cache goes
        self.seconds += time.perf_counter() - started
        return done

    @torch.no_grad()
    def probabilities(self) -> dict[str, float]:
        states = torch.cat(self._states, dim=1)
        mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
        values = torch.sigmoid(self.router(states, mask))[0]
        return dict(zip(self.router.config.domains, values.tolist()))


def save_router(path, router: MetaRouter, extra: dict | None = None) -> None:
    save_with_config(path, router.state_dict(), "meta_router", {"config": asdict(router.config), **(extra or {})})


def load_router(path: Path) -> tuple[MetaRouter, dict]:
    tensors, meta = load_with_config(path, "meta_router", "meta-router artifact")
    try:
        config = RouterConfig(**{"pooling": "attention", **meta["config"], "domains": tuple(meta["config"]["domains"])})
        router = MetaRouter(config)
        router.load_state_dict(tensors, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ArtifactError(path, f"not a meta-router artifact ({exc})") from exc
    return router.eval().requires_grad_(False), meta


def load_router_for(path: Path, model_config, domains: tuple[str, ...], base: str | None = None) -> MetaRouter:
    """The meta-router, refused (naming the file) unless it reads this base (`base`: its name) and
    routes served domains."""
    router, meta = load_router(path)
    if base is not None and meta.get("base", base) != base:
        raise ArtifactError(path, f"was trained on the base {meta['base']!r}, not on {base!r}")
    if router.config.hidden_size != model_config.hidden_size or router.config.middle_layer > model_config.num_hidden_layers:
        raise ArtifactError(path, f"router reads width {router.config.hidden_size}, layer {router.config.middle_layer}; "
                                  f"the base has width {model_config.hidden_size}, {model_config.num_hidden_layers} layers")
    if unknown := set(router.config.domains) - set(domains):
        raise ArtifactError(path, f"router routes domains the manifest does not serve: {sorted(unknown)}")
    return router


# ---------------------------------------------------------------- a request's route
@dataclass(frozen=True)
class RoutePlan:
    weights: dict[str, float]  # domain -> weight applied to its stacks
    gated_off: dict[str, str]  # domain -> why it is not applied
    reason: str
    probabilities: dict[str, float] | None = None  # the meta-router's output, when it ran


def plan_route(route: Route, domains: tuple[str, ...], stacks: dict[str, int], router: MetaRouter | None,
               probabilities: dict[str, float] | None, adapters: tuple[str, ...] = ()) -> RoutePlan:
    """The weights a request's route applies, and why every other domain and adapter stays off.
    `probabilities` are the router's for this prompt (needed for "auto" when a router is loaded)."""
    plan = _plan_domains(route, domains + tuple(a for a in adapters if a not in domains), stacks, router, probabilities)
    for adapter in adapters:
        if route == "auto" and adapter in plan.gated_off and router is not None and adapter not in router.config.domains:
            plan.gated_off[adapter] = ("an adapter the meta-router was not trained on: 'auto' leaves it off until "
                                       "the router is refit; name it in the route to apply it")
    return plan


def _plan_domains(route: Route, domains: tuple[str, ...], stacks: dict[str, int], router: MetaRouter | None,
                  probabilities: dict[str, float] | None) -> RoutePlan:
    if route == "none":
        return RoutePlan({}, {d: "route 'none'" for d in domains}, "route 'none': the base model alone was requested")
    if route == "auto":
        if not domains:
            return RoutePlan({}, {}, "no Brainstacks domains are loaded; the base model answered alone")
        if router is None:
            why = "no meta-router is loaded, so 'auto' applies no stacks; a {domain: weight} route applies them"
            return RoutePlan({}, {d: why for d in domains}, "no meta-router is loaded; the base model answered alone")
        weights, gated = router.route(torch.tensor([probabilities[d] for d in router.config.domains]))
        for domain in list(weights):
            if not stacks.get(domain):
                gated[domain] = "no stacks are loaded for this domain"
                del weights[domain]
        for domain in domains:
            if domain not in weights and domain not in gated:
                gated[domain] = "the meta-router does not know this domain"
        applied = ", ".join(f"{d} x {w:.2f}" for d, w in weights.items()) or "no domain"
        return RoutePlan(weights, gated, f"meta-router: applied {applied}", probabilities)
    weights, gated = {}, {}
    for domain in domains:
        weight = route.get(domain)
        if weight is None:
            gated[domain] = "not in the requested route"
        elif weight == 0:
            gated[domain] = "weight 0 requested"
        elif not stacks.get(domain):
            gated[domain] = "no stacks are loaded for this domain"
        else:
            weights[domain] = weight
    applied = ", ".join(f"{d} x {w:g}" for d, w in weights.items())
    reason = f"route requested explicitly: {applied}" if weights else \
        "route requested explicitly, but no requested domain has stacks; the base model answered alone"
    return RoutePlan(weights, gated, reason)
