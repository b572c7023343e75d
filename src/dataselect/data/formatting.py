"""Chat formatting: render an ``Example`` with the model's chat template, loss on answers only.

Each assistant turn is located by rendering the conversation up to it twice, with and without
the turn (``prefix + completion``), and tokenizing the two text pieces separately, so the
boundary between prompt tokens (label -100) and answer tokens is exact for any template.
Every assistant turn is scored, unless ``meta["loss"] == "last"`` (in-context demonstrations
as earlier turns, e.g. BBH validation): then only the final answer is.
Sequences longer than ``max_length`` are cut from the right; an example left with no answer
token is dropped and counted, never trained on (its gradient would be NaN).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from dataselect.data.records import Example

IGNORE_INDEX = -100

# Used when a tokenizer has no chat template (base models such as Llama-2-7B); the
# Tulu / LESS format.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>\n{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
    "{% else %}<|assistant|>\n{{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class Tokenized:
    id: str
    input_ids: list[int]
    labels: list[int]

    @property
    def n_loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class FormatStats:
    kept: int = 0
    truncated: int = 0
    dropped_no_answer_tokens: int = 0
    dropped_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {
            "kept": self.kept,
            "truncated": self.truncated,
            "dropped_no_answer_tokens": self.dropped_no_answer_tokens,
        }


def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def render(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    ensure_chat_template(tokenizer)
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def prompt_text(tokenizer, example: Example) -> str:
    """Everything before the final answer, ending with the assistant header (for generation)."""
    return render(tokenizer, example.messages[:-1], add_generation_prompt=True)


def tokenize_example(tokenizer, example: Example, max_length: int) -> tuple[Tokenized, bool]:
    """Token ids and labels (-100 outside assistant turns); returns (tokenized, was_truncated)."""
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    msgs = example.messages
    last = max(i for i, t in enumerate(msgs) if t["role"] == "assistant")
    only_last = example.meta.get("loss") == "last"  # earlier answers are in-context demos
    for i, turn in enumerate(msgs):
        if turn["role"] != "assistant":
            continue
        before = render(tokenizer, msgs[:i], add_generation_prompt=True)
        after = render(tokenizer, msgs[: i + 1])
        if not before.startswith(done) or not after.startswith(before):
            raise ValueError(
                f"chat template of {type(tokenizer).__name__} is not prefix-stable "
                f"on {example.id!r}"
            )
        prompt_ids = tokenizer(before[len(done) :], add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(after[len(before) :], add_special_tokens=False)["input_ids"]
        ids += prompt_ids + answer_ids
        scored = (
            list(answer_ids) if i == last or not only_last else [IGNORE_INDEX] * len(answer_ids)
        )
        labels += [IGNORE_INDEX] * len(prompt_ids) + scored
        done = after
    truncated = len(ids) > max_length
    return Tokenized(example.id, ids[:max_length], labels[:max_length]), truncated


def tokenize_examples(
    tokenizer, examples: Iterable[Example], max_length: int, memo: dict | None = None
) -> tuple[list[Tokenized], FormatStats]:
    """Tokenize many; drop (and count) those whose answer tokens were all truncated away.

    ``memo`` ((id, max_length) -> result) lets one run tokenize each example once across its
    stages; the limit is part of the key because validation tasks may set their own."""
    stats = FormatStats()
    out: list[Tokenized] = []
    for ex in examples:
        key = (ex.id, max_length)
        if memo is None or key not in memo:
            result = tokenize_example(tokenizer, ex, max_length)
            if memo is not None:
                memo[key] = result
        tok, truncated = result if memo is None else memo[key]
        stats.truncated += truncated
        if tok.n_loss_tokens == 0:
            stats.dropped_no_answer_tokens += 1
            stats.dropped_ids.append(ex.id)
            continue
        stats.kept += 1
        out.append(tok)
    return out, stats
