"""Rollouts for finetune_grpo.py: prompts taken from SFT samples, and a group of sampled answers to each.

A sample's conversation up to its last assistant turn is the prompt; that turn's text is the reference
answer the reward functions compare with (it is never trained on). sample_completions is the one call
that generates: a faster engine (vLLM, SGLang) replaces that function, and the loop stays as it is.
"""

import torch

from qwen_ft import grounding
from qwen_ft.collate import Collator
from qwen_ft.data.media import MediaError
from qwen_ft.data.read import DataError, raise_if_any
from qwen_ft.data.samples import Sample, Samples
from qwen_ft.video import VideoError


def prompt_and_reference(sample: Sample, collator: Collator) -> tuple[list[dict], str]:
    """The messages before the last one, an assistant's (the prompt), and that answer's text (the reference): its
    boxes and points written as the collator's model writes them, read as a decoded answer reads (without
    Qwen2-VL's grounding tokens, which decoding drops)."""
    answer = collator.render([sample.messages[-1]], sample.image_sizes)[0]
    text = "".join(part["text"] for part in answer["content"] if part["type"] == "text")
    return sample.messages[:-1], grounding.as_decoded(text)


def check_prompts(samples: Samples) -> None:
    """DataError naming every sample that doesn't end with an assistant's answer after a user's question."""
    problems = []
    for sample in samples:
        roles = [message["role"] for message in sample.messages]
        if roles[-1] != "assistant":
            problems.append(
                f"{sample.where}: the last message is a {roles[-1]}'s: GRPO takes the conversation up to the last "
                "assistant message as the prompt, and that message as the reference answer"
            )
        elif "user" not in roles[:-1]:
            problems.append(f"{sample.where}: no user message before the last assistant message")
    raise_if_any(problems)


class PromptCollator:
    """Turns samples into a micro-batch of prompts, each repeated num_generations times in a row (a group),
    left-padded so that every row ends where its answer begins, with each row's reference and sample."""

    def __init__(self, collator: Collator, num_generations: int):
        self.collator = collator
        self.num_generations = num_generations

    def __call__(self, samples: list[Sample]) -> dict:
        kept, media, bad = [], [], []
        for sample in samples:
            try:
                media.append(self.collator.media(sample.messages))
                kept.append(sample)
            except MediaError as e:
                bad.append(f"{sample.where}: {'video' if isinstance(e, VideoError) else 'image'} {e}")
        if not kept:
            raise DataError(f"every sample of a micro-batch failed to load, the first: {bad[0]}")
        prompts, references = zip(*(prompt_and_reference(sample, self.collator) for sample in kept))
        group = range(self.num_generations)
        batch = self.collator.process(
            [prompt for prompt in prompts for _ in group],
            generation_prompt=True,
            padding_side="left",
            media=[sample_media for sample_media in media for _ in group],
        )
        batch = dict(batch)
        if self.collator.blank_image and "pixel_values" not in batch and "pixel_values_videos" not in batch:
            batch = self.collator.add_blank_image(batch, at="start")
        return {
            "prompt": batch,
            "references": [reference for reference in references for _ in group],
            "samples": [sample for sample in kept for _ in group],
            "bad_samples": bad,
        }


@torch.no_grad()
def sample_completions(
    model,
    prompt: dict,
    collator: Collator,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    synced_gpus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampled answer per prompt row, with the KV cache: (rows, longest answer) token ids, right-padded,
    and the mask of each answer's tokens (up to and including the <|im_end|> that ends it).

    Sampling draws from torch's generator seeded with `seed` alone, so a resumed run samples what the
    interrupted one would have. synced_gpus keeps every FSDP rank stepping until all have finished.
    """
    tokenizer, tokens = collator.processor.tokenizer, collator.tokens
    devices = [prompt["input_ids"].device] if prompt["input_ids"].is_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        # Every sampling setting is given, so none comes from the model's generation_config (Qwen's
        # instruct models ship top_k=1 and a repetition penalty there).
        output = model.generate(
            **prompt,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            min_p=None,
            repetition_penalty=1.0,
            # A vision token in an answer would make the training forward look for an image that isn't there.
            suppress_tokens=[tokens.vision_start, tokens.vision_end, tokens.image_pad, tokens.video_pad],
            max_new_tokens=max_new_tokens,
            eos_token_id=tokens.im_end,
            pad_token_id=tokenizer.pad_token_id,
            synced_gpus=synced_gpus,
        )
    completion = output[:, prompt["input_ids"].shape[1] :]
    # generate pads the rows that finished early; an answer is its tokens up to its first <|im_end|>.
    ended = (completion == tokens.im_end).long().cumsum(1)
    mask = (ended == 0) | ((ended == 1) & (completion == tokens.im_end))
    return completion, mask


def with_completions(prompt: dict, completion: torch.Tensor, mask: torch.Tensor) -> dict:
    """The model input of each prompt row followed by its answer (padding after the answer masked out)."""
    batch = dict(prompt)
    batch["input_ids"] = torch.cat([prompt["input_ids"], completion], dim=1)
    batch["attention_mask"] = torch.cat([prompt["attention_mask"], mask.to(prompt["attention_mask"].dtype)], dim=1)
    if "mm_token_type_ids" in prompt:  # answers are text: type 0
        batch["mm_token_type_ids"] = torch.nn.functional.pad(prompt["mm_token_type_ids"], (0, completion.shape[1]))
    return batch
