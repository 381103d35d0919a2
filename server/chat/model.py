"""The chat model: a causal LM loaded through transformers (4-bit NF4 via bitsandbytes), its
domains' frozen Brainstacks stacks, and the meta-router that picks them per request.

`load_chat` builds the whole of it from the manifest's chat section; the server's registry and
every training evaluation load it the same way. `ChatModel.answer` is what the chat worker runs
per request: plan the route (the meta-router for "auto"), then generate with those stacks on.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.generation.stopping_criteria import StopStringCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from server.artifacts import ArtifactError, own_memory
from server.chat.moe_lora import disable_cpu_weight_packing, routed, wrap_projections
from server.chat.router import MetaRouter, Route, RoutePlan, load_router_for, plan_route
from server.chat.stacks import DomainStacks, load_domain_stacks, mounted
from server.manifest import ArtifactResolver, ChatBase, ChatSection

log = logging.getLogger(__name__)


def nf4_config(device: str) -> BitsAndBytesConfig:
    """QLoRA's storage format: NF4 weights, double-quantised scales."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if device == "cuda" else torch.float32,
    )


@dataclass(frozen=True)
class ChatJob:
    messages: list[dict[str, str]]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    route: Route = "auto"
    stop: tuple[str, ...] = ()  # the answer ends before the first of these
    input_ids: torch.Tensor | None = None  # the rendered prompt, when the request path already has it
    min_tokens: int = 0  # the end of turn is not sampled before this many tokens (fixed-length benchmarks)


@dataclass
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence or a stop sequence) or "length" (max_new_tokens reached)
    token_times: list[float] = field(default_factory=list)  # perf_counter() per generated token
    started: float = 0.0
    plan: RoutePlan | None = None  # the stacks this answer ran with, and why
    route_seconds: float = 0.0  # planning the route (the meta-router's forward, for "auto")


class _TokenClock(BaseStreamer):
    """Records when each new token appears: time to first token and inter-token latency."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._saw_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._saw_prompt:  # generate() first hands over the prompt itself
            self._saw_prompt = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass
class ChatModel:
    spec: ChatBase
    model: torch.nn.Module
    tokenizer: object
    device: str
    domains: tuple[str, ...] = ()  # the manifest's, in curriculum order
    stacks: dict[str, DomainStacks] = field(default_factory=dict)  # held outside the base's modules
    router: MetaRouter | None = None
    # Fast tokenizers refuse concurrent use ("Already borrowed"): requests count tokens on the
    # event loop while the worker decodes.
    _tokenizer_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

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

    def answer(self, job: ChatJob) -> ChatResult:
        """What the chat worker runs per request: plan the job's route, then generate with it."""
        plan = self.plan_route(job.route, job.messages)
        result = self.generate(job, plan.weights)
        result.plan = plan
        return result

    def plan_route(self, route: Route, messages: list[dict[str, str]]) -> RoutePlan:
        asks_router = route == "auto" and self.router is not None and bool(self.domains)
        probabilities = self.router_probabilities(messages) if asks_router else None
        counts = {domain: stacks.count for domain, stacks in self.stacks.items()}
        return plan_route(route, self.domains, counts, self.router, probabilities)

    def mounted(self):
        """This model's stacks on the shared base, for one request (see server/chat/stacks.py)."""
        return mounted(self.model, [self.stacks[d] for d in self.domains if d in self.stacks])

    def router_probabilities(self, messages: list[dict[str, str]]) -> dict[str, float]:
        """The meta-router's sigmoid per domain, from the frozen base's hidden states (stacks off)."""
        input_ids = self.encode(messages).to(self.device)
        probabilities = self.router.probabilities(self.model, input_ids, torch.ones_like(input_ids))[0]
        return dict(zip(self.router.config.domains, probabilities.tolist()))

    @property
    def name(self) -> str:
        return self.spec.name

    def encode(self, messages: list[dict[str, str]]) -> torch.Tensor:
        """The prompt as the model was tuned to see it: its own chat template (system, user and
        assistant turns), then the header of the assistant's turn. A template may refuse a
        conversation (some refuse a system turn): that raises, with the template's reason."""
        with self._tokenizer_lock:
            if self.tokenizer.chat_template:
                enc = self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
                )
                return enc["input_ids"]
            text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
            return self.tokenizer(text, return_tensors="pt").input_ids

    def decode(self, ids: torch.Tensor) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def generate(self, job: ChatJob, route: dict[str, float] | None = None) -> ChatResult:
        """Generate with these per-domain stack weights applied ({} or None: the base alone)."""
        with self.mounted(), routed(self.model, route or {}):
            return self._generate(job)

    def _generate(self, job: ChatJob) -> ChatResult:
        started = time.perf_counter()
        input_ids = (job.input_ids if job.input_ids is not None else self.encode(job.messages)).to(self.device)
        stops = {}
        if job.stop:  # built here, under the lock: it reads the vocabulary once, generate() never again
            with self._tokenizer_lock:
                stops["stopping_criteria"] = StoppingCriteriaList([StopStringCriteria(self.tokenizer, list(job.stop))])
        clock = _TokenClock()
        sampling = job.temperature > 0
        torch.manual_seed(job.seed)  # one worker thread runs chat jobs, so the global RNG is ours
        output = self.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=job.max_new_tokens,
            do_sample=sampling,
            temperature=job.temperature if sampling else None,
            top_p=job.top_p if sampling else None,
            top_k=None,
            min_new_tokens=job.min_tokens or None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=list(self.end_of_turn_ids),
            streamer=clock,
            **stops,
        )
        new_tokens = output[0, input_ids.shape[1]:]
        text = self.decode(new_tokens)
        cuts = [i for i in (text.find(s) for s in job.stop) if i >= 0]
        if cuts:
            text = text[:min(cuts)]  # the stop sequence itself is not part of the answer
        # Anything but running out of max_new_tokens is a natural end: end of turn or a stop sequence.
        stopped = bool(cuts) or len(new_tokens) < job.max_new_tokens or (
            len(new_tokens) > 0 and new_tokens[-1].item() in self.end_of_turn_ids)
        return ChatResult(
            text=text.strip(),
            prompt_tokens=int(input_ids.shape[1]),
            completion_tokens=int(len(new_tokens)),
            finish_reason="stop" if stopped else "length",
            token_times=clock.times,
            started=started,
        )


def load_chat_base(spec: ChatBase, resolver: ArtifactResolver, device: str) -> ChatModel:
    """The base model alone (no stacks, no router)."""
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
        # bitsandbytes' CPU fast path (where the CPU has AVX512-BF16) repacks the 4-bit weights and
        # multiplies in bfloat16: the base would answer differently from the one its stacks were
        # trained on and from machine to machine, and a batch's rows would no longer match their
        # requests alone. Keep float32 compute, as the quantisation config asks.
        disable_cpu_weight_packing(model)
    own_memory(model.eval().requires_grad_(False))
    wrap_projections(model)  # stacks are mounted per request; with none mounted a projection is the base's
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
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
