"""Preference pairs for finetune_dpo.py: a prompt, a chosen answer and a rejected one.

A pair is read in the forms people have it, each turned into two samples of one of formats.py's formats
(the prompt followed by the chosen answer, and the prompt followed by the rejected one), which then
go through the same checks as any training sample (data.read_samples), media and lengths included:

    qwen-ft's  {"messages": [prompt messages], "chosen": "answer" or [parts], "rejected": ...}
    TRL's      {"images": [...], "prompt": [messages], "chosen": [{"role": "assistant", "content": ...}],
                "rejected": [...]}, or with an implicit prompt: "chosen" and "rejected" whole conversations
                that differ only in their last (assistant) message
    sharegpt   {"conversations": [{"from": "human", "value": "<image>..."}], "chosen": {"from": "gpt", "value": ...},
                "rejected": {...}, "images": [...]}: LLaMA-Factory's ranking form ("messages" with "role" too)
    qa         {"question": ..., "chosen": ..., "rejected": ..., "image": ...}: a table's columns, as RLAIF-V has them

A pair's answer is one assistant message. Only the answer is trained on: its tokens and its <|im_end|>,
the label rule of SFT applied to the last assistant turn alone (answer_only), so that the assistant
turns of a multi-turn prompt count in neither answer's log-probability.
"""

import json
import sys
from dataclasses import dataclass

import numpy as np
import torch

from qwen_ft.collate import IGNORE_INDEX, Collator
from qwen_ft.data.checked import check_and_measure
from qwen_ft.data.formats import ROLE_NAMES
from qwen_ft.data.media import MediaError
from qwen_ft.data.read import PAIR_KEYS, DataError, describe, mix, raise_if_any, read_samples
from qwen_ft.data.samples import Sample, Samples
from qwen_ft.video import VideoError

SIDES = ("chosen", "rejected")


def split_pair(record: dict) -> dict[str, dict]:
    """The chosen and the rejected conversation of a pair, each a sample in the pair's own format (its prompt
    followed by that answer) with the record's other keys; ValueError says what is wrong."""
    for side in SIDES:
        if record.get(side) is None:
            raise ValueError(f"no '{side}' answer: a preference pair needs both a 'chosen' and a 'rejected' one")
    rest = {key: value for key, value in record.items() if key not in PAIR_KEYS}
    if "prompt" in record:  # TRL's explicit prompt
        prompt = record["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if not isinstance(prompt, list):
            raise ValueError("'prompt' is neither a list of messages nor a string")
        if "messages" in rest or "conversations" in rest:
            raise ValueError("the pair has both a 'prompt' and a conversation: give the prompt once")
        answers = {side: answer_message(record[side], side, "role") for side in SIDES}
        pair = {side: {**rest, "messages": prompt + [answers[side]]} for side in SIDES}
    elif not {"messages", "conversations", "question"} & set(rest) and all(isinstance(record[s], list) for s in SIDES):
        # TRL's implicit prompt: two whole conversations
        chosen, rejected = record["chosen"], record["rejected"]
        if not chosen or not rejected or chosen[:-1] != rejected[:-1]:
            raise ValueError(
                "'chosen' and 'rejected' are conversations that differ before their last message: a pair's two "
                "conversations share the prompt and differ in the answer, their last message"
            )
        answers = {side: answer_message(record[side][-1:], side, "role") for side in SIDES}
        pair = {side: {**rest, "messages": record[side]} for side in SIDES}
    elif "conversations" in rest or "messages" in rest:  # LLaMA-Factory's ranking form, or qwen-ft's own
        key = "conversations" if "conversations" in rest else "messages"
        if not isinstance(rest[key], list):
            raise ValueError(f"'{key}' is not a list of messages")
        speaker = "from" if rest[key] and isinstance(rest[key][0], dict) and "from" in rest[key][0] else "role"
        answers = {side: answer_message(record[side], side, speaker) for side in SIDES}
        pair = {side: {**rest, key: rest[key] + [answers[side]]} for side in SIDES}
    elif "question" in rest:  # a table's question, with its answers as columns
        answers = {side: record[side] for side in SIDES}
        pair = {side: {**rest, "answer": record[side]} for side in SIDES}
    else:
        raise ValueError('no "prompt", "messages", "conversations" or "question" to read the pair\'s prompt from')
    if same_answer(answers["chosen"], answers["rejected"]):
        raise ValueError("'chosen' and 'rejected' are the same answer, which teaches nothing: remove the pair")
    return pair


def answer_message(answer, side: str, speaker: str) -> dict:
    """A pair's answer as an assistant message in the conversation's style (speaker: "role" or "from"), from a
    string, a list of parts, a message, or a list holding one message (TRL's)."""

    def is_message(value) -> bool:
        return isinstance(value, dict) and ("role" in value or "from" in value)

    if isinstance(answer, list) and answer and all(is_message(m) for m in answer):
        if len(answer) != 1:
            raise ValueError(f"'{side}' holds {len(answer)} messages; a pair's answer is one assistant message")
        answer = answer[0]
    if is_message(answer):
        role = answer.get("role", answer.get("from"))
        if ROLE_NAMES.get(role) != "assistant":
            raise ValueError(f"'{side}' is a message of {role!r}; a pair's answer is the assistant's")
        return answer
    return {"from": "gpt", "value": answer} if speaker == "from" else {"role": "assistant", "content": answer}


def same_answer(chosen, rejected) -> bool:
    """Whether two answers, in whatever form, say the same: their text parts compared, and any other part."""

    def said(answer) -> str:
        if isinstance(answer, dict):
            answer = answer.get("content", answer.get("value"))
        parts = answer if isinstance(answer, list) else [answer]
        texts = [p if isinstance(p, str) else p.get("text", p) if isinstance(p, dict) else p for p in parts]
        return json.dumps(texts, sort_keys=True, default=str)

    return said(chosen) == said(rejected)


@dataclass
class Pairs:
    """The pairs of a run: `sides` holds each pair's chosen conversation at position 2k and its rejected one
    at 2k+1, as read; `order` the pairs of this view (their numbers k), in order. pairs[i] is (k, chosen,
    rejected), what PairCollator takes."""

    sides: Samples
    order: np.ndarray

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Pairs(self.sides, self.order[i])
        k = int(self.order[i])
        return k, self.sides.sample(2 * k), self.sides.sample(2 * k + 1)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        """Tokens a pair costs in a padded micro-batch: its two rows, each as long as the longer side."""
        table = self.sides.table["length"]
        return 2 * np.maximum(table[2 * self.order], table[2 * self.order + 1])

    def where(self, i: int) -> str:
        return self.sides.where(2 * int(self.order[i]))


def read_pairs(spec: str, cfg, special_tokens: tuple[str, ...]) -> Samples:
    """The pairs of spec as samples, two a pair (Pairs.sides), each side's structure checked."""
    return read_samples(spec, special_tokens=special_tokens, split=split_pair, **cfg.reading())


def checked_pairs(spec: str, cfg, collator: Collator, dist) -> Pairs:
    """The pairs of --data (or --eval-data), checked (structure, media, length) before the model loads, and
    mixed by their sources' weights. A pair with a side longer than --max-length is skipped, with a warning:
    cutting one answer short would change what the pair prefers."""
    sides = read_pairs(spec, cfg, collator.tokens.all_strings)
    chosen = sides.select(np.arange(0, len(sides), 2))
    for line in describe(chosen, unit="pairs"):
        dist.print(line)
    check_and_measure(sides, cfg, collator, dist, kind="pairs")
    tokens = sides.table["measure"][:, 0]
    sides.table["length"][:] = np.minimum(tokens, cfg.max_length)
    fits = (tokens[0::2] <= cfg.max_length) & (tokens[1::2] <= cfg.max_length)
    if not fits.all() and dist.is_main:
        first = sides.where(2 * int(np.argmin(fits)))
        print(
            f"warning: skipped {(~fits).sum()} of {len(fits)} pairs with an answer that ends past --max-length "
            f"{cfg.max_length} (first: {first}); raise --max-length or lower --max-pixels to keep them",
            file=sys.stderr,
        )
    if not fits.any():
        raise DataError(f"{spec}: no pair fits in --max-length {cfg.max_length}")
    mixed = mix(chosen.select(np.flatnonzero(fits)), cfg.seed)
    return Pairs(sides, mixed.order // 2)


def check_pair_budget(pairs: Pairs, max_tokens: int) -> None:
    """DataError naming every pair whose two rows would not fit in a micro-batch of max_tokens on their own."""
    raise_if_any(
        [
            f"{pairs.where(i)}: its two sides take {length} tokens padded, more than --max-tokens {max_tokens}; "
            "raise --max-tokens (or lower --max-length or --max-pixels)"
            for i, length in enumerate(pairs.lengths.tolist())
            if length > max_tokens
        ]
    )


def answer_only(labels: torch.Tensor) -> torch.Tensor:
    """The labels of each row with only its last trained span kept: the answer and its <|im_end|>. The
    assistant turns before it, part of the prompt, are -100 like the rest of the prompt."""
    labels = labels.clone()
    for row in labels:
        trained = (row != IGNORE_INDEX).nonzero().flatten().tolist()
        if not trained:
            continue
        start = trained[-1]
        while start > 0 and row[start - 1] != IGNORE_INDEX:
            start -= 1
        row[:start] = IGNORE_INDEX
    return labels


class PairCollator:
    """A micro-batch of pairs as one batch of 2B rows: the B chosen conversations, then the B rejected ones,
    labels on each answer alone. Each pair's media are loaded once and given to both of its rows.

    Beside the model's inputs: "pairs" (B), "pair_numbers" (each pair's number k, for what was computed for it
    before training) and "bad_samples" (a line for each pair whose media failed to load, left out)."""

    def __init__(self, collator: Collator):
        self.collator = collator

    def __call__(self, pairs: list[tuple[int, Sample, Sample]]) -> dict:
        kept, media, bad = [], [], []
        for number, chosen, rejected in pairs:
            try:
                media.append(self.collator.media(chosen.messages))
                kept.append((number, chosen, rejected))
            except MediaError as e:
                bad.append(f"{chosen.where}: {'video' if isinstance(e, VideoError) else 'image'} {e}")
        conversations = [chosen.messages for _, chosen, _ in kept] + [rejected.messages for _, _, rejected in kept]
        batch = self.collator.batch(conversations, media + media)
        batch["labels"] = answer_only(batch["labels"])
        numbers = torch.tensor([number for number, _, _ in kept], dtype=torch.long)
        return {**batch, "pairs": len(kept), "pair_numbers": numbers, "bad_samples": bad}
