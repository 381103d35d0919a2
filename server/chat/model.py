"""The chat model: a causal LM loaded through transformers (4-bit NF4 via bitsandbytes, or float per
device), its domains' frozen Brainstacks stacks, and the meta-router that picks them per request.

`load_chat_base` loads the base alone (the registry loads its stacks and router as entries of their
own); `load_chat` loads a whole manifest chat section at once (training and the benchmarks). How a
request is answered (route planning, prefill, decode steps, stopping) is server/chat/decoding.py;
the chat engine that batches requests is server/chat/batching.py.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.artifacts import ArtifactError, own_memory
from server.chat.adapters import LoraAdapter
from server.chat.moe_lora import Weights, stacked_projections, wrap_projections, wrapped_layers
from server.chat.nf4 import disable_cpu_weight_packing, nf4_config
from server.chat.router import MetaRouter, RoutePlan, RouterPass, load_router_for, plan_route
from server.chat.stacks import DomainStacks, ServedStacks, load_domain_stacks
from server.manifest import ArtifactResolver, ChatBase, ChatSection

log = logging.getLogger(__name__)

# The conversation of a base without a chat template (a pretrained model): "role: content" lines,
# then "assistant:" for the answer, after the tokenizer's BOS where it has one.
PLAIN_TURNS = ("{{ bos_token if bos_token else '' }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
               "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def last_user_turn(messages: list[dict[str, str]]) -> str:
    """What a single-prompt reader (an imported router, an imported prompt template) is given."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


@dataclass
class ChatModel:
    spec: ChatBase
    model: torch.nn.Module
    tokenizer: object
    device: str
    domains: tuple[str, ...] = ()  # the manifest's, in curriculum order
    stacks: dict[str, DomainStacks] = field(default_factory=dict)  # held outside the base's modules
    router: MetaRouter | None = None
    adapters: dict[str, LoraAdapter] = field(default_factory=dict)  # PEFT LoRA adapters, routed by name
    # Fast tokenizers refuse concurrent use ("Already borrowed"): requests count tokens on the
    # event loop while the worker decodes.
    _tokenizer_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _served: tuple[tuple, ServedStacks] | None = field(default=None, init=False, repr=False)
    # structured output's view of the tokenizer (server/chat/structured.py), built at the first use
    constraint_tokenizer: object | None = field(default=None, init=False, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def end_of_turn_ids(self) -> tuple[int, ...]:
        """Tokens that end an answer: the tokenizer's end of sequence and the generation config's
        (chat models often end a turn with a token of their own, such as Gemma's <end_of_turn>)."""
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        configured = configured if isinstance(configured, list) else [configured]
        return tuple(dict.fromkeys(i for i in [self.tokenizer.eos_token_id, *configured] if i is not None))

    @property
    def precision(self) -> str:
        return self.spec.precision(self.device)

    @property
    def context_length(self) -> int:
        """Tokens of prompt plus answer the model was trained to attend over."""
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)

    @property
    def route_names(self) -> tuple[str, ...]:
        """Every name a route may give a weight: the domains, in curriculum order, then the adapters."""
        return self.domains + tuple(a for a in self.adapters if a not in self.domains)

    def asks_router(self, route) -> bool:
        """Whether this route needs the meta-router's read of the prompt."""
        return route == "auto" and self.router is not None and bool(self.domains)

    def plan_route(self, route, messages: list[dict[str, str]], probabilities: dict[str, float] | None = None
                   ) -> RoutePlan:
        """The weights a request's route applies, and why (for "auto": the meta-router's
        `probabilities` for this prompt, read now unless given)."""
        if probabilities is None and self.asks_router(route):
            probabilities = self.router_probabilities(messages)
        counts = {domain: stacks.count for domain, stacks in self.stacks.items()} | {a: 1 for a in self.adapters}
        return plan_route(route, self.domains, counts, self.router, probabilities, tuple(self.adapters))

    def router_pass(self, input_ids: torch.Tensor) -> RouterPass:
        """The meta-router's read of a prompt, to run in parts (`RouterPass.advance`)."""
        return RouterPass(self.router, self.model, input_ids.to(self.device))

    def router_probabilities(self, messages: list[dict[str, str]]) -> dict[str, float]:
        """The meta-router's sigmoid per domain, from the frozen base's hidden states (stacks off)."""
        reading = self.router_pass(self.router_input(messages))
        reading.advance()
        return reading.probabilities()

    def router_input(self, messages: list[dict[str, str]], rendered: torch.Tensor | None = None) -> torch.Tensor:
        """The prompt as the meta-router reads it: as the chat template renders it (`rendered`, when
        given), or, for a router that reads text (the Brainstacks authors'), the last user turn
        alone, without special tokens, cut to the router's `max_tokens`."""
        config = self.router.config
        text = last_user_turn(messages)
        if config.reads == "template" or not text.strip():
            return rendered if rendered is not None else self.encode(messages)
        with self._tokenizer_lock:
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        return ids[:, :config.max_tokens] if config.max_tokens else ids

    def prompt_template(self, weights: dict[str, float]) -> str | None:
        """The prompt template the applied domains' stacks were trained with, where they all have the
        same one (imported stacks record theirs); None: the model's own chat template."""
        templates = {self.stacks[d].prompt_template for d in weights if d in self.stacks}
        return templates.pop() if len(templates) == 1 else None

    def encode_with(self, template: str, messages: list[dict[str, str]]) -> torch.Tensor:
        """The last user turn in a domain's prompt template ("{instruction}" marks where), with the
        tokenizer's special tokens, as such stacks were trained."""
        with self._tokenizer_lock:
            return self.tokenizer(template.replace("{instruction}", last_user_turn(messages)),
                                  return_tensors="pt").input_ids

    @property
    def served_stacks(self) -> ServedStacks:
        """This model set's stacks as its requests mount them (built once per set of stacks)."""
        mounted = [self.stacks[d] for d in self.domains if d in self.stacks]
        adapters = list(self.adapters.values())
        key = tuple(id(d) for d in mounted + adapters)
        if self._served is None or self._served[0] != key:
            self._served = (key, ServedStacks(wrapped_layers(self.model), mounted, adapters))
        return self._served[1]

    def mounted(self, route: Weights):
        """This model's stacks on the shared base at these weights, for one step or request."""
        return stacked_projections(self.model).mounted(self.served_stacks, route)

    def encode(self, messages: list[dict[str, str]]) -> torch.Tensor:
        """The prompt as the model was tuned to see it: its own chat template (system, user and
        assistant turns), then the header of the assistant's turn. A template may refuse a
        conversation (some refuse a system turn): that raises, with the template's reason."""
        with self._tokenizer_lock:
            enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=True)
            return enc["input_ids"]

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)


def load_chat_base(spec: ChatBase, resolver: ArtifactResolver, device: str) -> ChatModel:
    """The base model alone (no stacks, no router), its projections wrapped for stacks."""
    folder = resolver.source(spec.source)
    precision = spec.precision(device)
    kwargs: dict = dict(use_safetensors=True, local_files_only=True)
    if precision == "nf4":
        kwargs.update(quantization_config=nf4_config(device), device_map={"": device})
    else:
        kwargs.update(dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as exc:
        raise ArtifactError(folder, f"cannot load the chat model: {exc}") from exc
    if precision == "none":
        model.to(device)
    else:
        disable_cpu_weight_packing(model)
    own_memory(model.eval().requires_grad_(False))
    wrap_projections(model)  # stacks are mounted per request; with none mounted a projection is the base's
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:  # a pretrained base: served, and its stacks trained, on plain turns
        tokenizer.chat_template = PLAIN_TURNS
    if spec.placeholder:
        log.warning("!!! chat model %r is an UNTRAINED PLACEHOLDER: its replies are noise !!!", spec.name)
    return ChatModel(spec, model, tokenizer, device)


def load_chat(section: ChatSection, resolver: ArtifactResolver, device: str) -> ChatModel:
    """The whole chat model of a manifest's chat section: the base, every domain's frozen stacks
    (verified now, so a bad file is refused at load, not mid-request) and the meta-router."""
    chat = load_chat_base(section.base, resolver, device)
    chat.domains = tuple(d.name for d in section.domains)  # the manifest keeps them in curriculum order
    for domain in section.domains:
        paths = [resolver.artifact(artifact) for artifact in domain.stacks]
        chat.stacks[domain.name] = load_domain_stacks(chat.model, domain.name, paths, chat.name)
    if section.router is not None:
        router = load_router_for(resolver.artifact(section.router), chat.model.config, chat.domains, chat.name)
        chat.router = router.to(device)
    return chat
