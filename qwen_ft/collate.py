"""From samples to model inputs: the model's chat template and processor, plus labels on assistant turns.

The collator runs in DataLoader workers, so it loads media and tokenizes but never touches a device.
"""

from dataclasses import dataclass

import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
from transformers.video_utils import VideoMetadata

from qwen_ft import grounding
from qwen_ft.config import ConfigError
from qwen_ft.data.media import MediaError, hide_pil_size_warning, load_image
from qwen_ft.data.samples import Sample
from qwen_ft.families import family_of_processor
from qwen_ft.packing import pack
from qwen_ft.video import VideoError, VideoSettings, clip_metadata, load_video

IGNORE_INDEX = -100  # label of positions that don't count in the loss (cross_entropy's ignore_index)
# What every Qwen chat template writes for a video part, which the processor then expands at its <|video_pad|>.
TEMPLATE_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
# Per-token tensors of a processor batch; the rest (pixel_values, *_grid_thw) are per image or video.
TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the chat-format tokens, looked up in the model's own tokenizer."""

    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int
    assistant_header: tuple[int, ...]  # "<|im_start|>assistant"; the template puts one newline token after it
    all_strings: tuple[str, ...]  # every special token's text, which must not appear in training text

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialTokens":
        names = ("im_start", "im_end", "vision_start", "vision_end", "image_pad", "video_pad")
        ids = {}
        for name in names:
            token = f"<|{name}|>"
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.decode([token_id]) != token:
                raise ConfigError(f"the tokenizer has no {token} token: this is not a Qwen vision-language chat model")
            ids[name] = token_id
        header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
        if header[0] != ids["im_start"] or tokenizer.decode(header[-1:]) != "\n":
            raise ConfigError(f"unexpected tokenization of the assistant header: {header}")
        return cls(**ids, assistant_header=tuple(header[:-1]), all_strings=tuple(tokenizer.all_special_tokens))


def writes_frame_pairs(processor) -> bool:
    """Whether the processor writes each frame of a video between a <|vision_start|> and <|vision_end|> of its own
    (Qwen3-VL's, after the frame's time), asked of its expansion of a one-token video."""
    merge = processor.video_processor.merge_size
    video = {"video_grid_thw": torch.tensor([[1, merge, merge]]), "video_metadata": [clip_metadata([0.0], 1.0)]}
    return "<|vision_start|>" in processor.replace_video_token(video, 0)


def assistant_labels(ids: list[int], tokens: SpecialTokens) -> list[int]:
    """Labels for one sequence: the content of every assistant turn and its closing <|im_end|>; -100 elsewhere.

    A turn is found by its header, <|im_start|> followed by the tokens of "assistant". <|im_start|>
    is a special token that user text cannot produce, so "assistant" inside a message cannot
    start a trained span.
    """
    labels = [IGNORE_INDEX] * len(ids)
    header = list(tokens.assistant_header)
    i = 0
    while (i := index_of(ids, header[0], i)) < len(ids):
        if ids[i : i + len(header)] != header:
            i += 1
            continue
        start = i + len(header) + 1  # skip the newline that ends the header
        end = min(index_of(ids, tokens.im_end, start) + 1, len(ids))  # with <|im_end|>: the model must learn to stop
        labels[start:end] = ids[start:end]
        i = end
    return labels


def index_of(ids: list[int], token: int, start: int) -> int:
    """The first position of token at or after start, or len(ids)."""
    try:
        return ids.index(token, start)
    except ValueError:
        return len(ids)


class Collator:
    """Turns a list of samples into one right-padded batch with labels (or one packed row: see packing.py)."""

    def __init__(
        self,
        processor,
        max_length: int,
        video: VideoSettings | None = None,
        blank_image: bool = False,
        rope_index=None,
    ):
        """rope_index: the model's (packing.rope_index_of) to pack each batch into one row; None pads."""
        self.processor = processor
        self.rope_index = rope_index
        self.max_length = max_length
        self.blank_image = blank_image  # give batches without images one, masked out (add_blank_image)
        self.video = video or VideoSettings()  # defaults for video parts; a sample's own keys override them
        self.tokens = SpecialTokens.from_tokenizer(processor.tokenizer)
        # A template with a thinking block (Qwen3.5's) closes it empty in the generation prompt, as it opens
        # the assistant turns trained on. Passed only where the template reads it: transformers takes any
        # other keyword for a processor option and warns.
        thinking = "enable_thinking" in (processor.chat_template or "")
        self.template_options = {"enable_thinking": False} if thinking else {}
        video_processor = processor.video_processor
        self.video_factor = video_processor.patch_size * video_processor.merge_size  # frame sides are multiples
        self.max_pixels = processor.image_processor.size["longest_edge"]  # --max-pixels: what images shrink to
        hide_pil_size_warning()  # load_image refuses what PIL would warn about
        # Qwen3-VL's processor (Qwen3-VL-MoE's and Qwen3.5's too) writes each frame of a video as its time and
        # a pair of its own: <0.5 seconds><|vision_start|>...<|vision_end|>. The released processor put that in
        # place of the template's three tokens, and so do LLaMA-Factory and serving engines: that is the text the
        # models know. transformers 5 expands the <|video_pad|> alone, keeping the template's pair around all the
        # frames; texts() drops that pair.
        self.frames_in_own_pairs = writes_frame_pairs(processor)
        self.family = family_of_processor(processor)  # how it writes boxes and points (grounding.py)

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """An image's (height, width) as the image processor resizes it: Qwen's smart resize with its settings."""
        image_processor = self.processor.image_processor
        factor = image_processor.patch_size * image_processor.merge_size
        size = image_processor.size
        return smart_resize(height, width, factor, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])

    def render(self, conversation: list[dict], image_sizes: list[tuple[int, int]]) -> list[dict]:
        """The conversation with its boxes and points written as this model's family writes them, for images of
        these (height, width) sizes, in the numbers the model sees after the resize (grounding.py)."""
        return grounding.render(conversation, image_sizes, self.family, self.resized)

    def texts(self, conversations: list[list[dict]], generation_prompt: bool = False) -> list[str]:
        """The chat template's text of each conversation: one call for all, which pays the template's set-up once."""
        texts = self.processor.apply_chat_template(
            conversations, tokenize=False, add_generation_prompt=generation_prompt, **self.template_options
        )
        if self.frames_in_own_pairs:
            texts = [text.replace(TEMPLATE_VIDEO, "<|video_pad|>") for text in texts]
        return texts

    def media(self, conversation: list[dict]) -> tuple[list, list]:
        """A conversation's images and videos (frames, metadata), loaded; MediaError if one fails."""
        parts = [part for message in conversation for part in message["content"]]
        images = [load_image(part["image"], self.max_pixels) for part in parts if part["type"] == "image"]
        videos = [self.load_video(part) for part in parts if part["type"] == "video"]
        return images, videos

    def process(self, conversations: list[list[dict]], generation_prompt=False, padding_side="right", media=None):
        """The processor's batch for these conversations, with their media (loaded here unless given)."""
        media = media if media is not None else [self.media(c) for c in conversations]
        sizes = [[(image.height, image.width) for image in images] for images, _ in media]
        texts = self.texts([self.render(c, s) for c, s in zip(conversations, sizes)], generation_prompt)
        images = [image for sample_images, _ in media for image in sample_images]
        videos = [video for _, sample_videos in media for video in sample_videos]
        batch = self.processor(
            text=texts,
            images=images or None,
            videos=[frames for frames, _ in videos] or None,
            video_metadata=[metadata for _, metadata in videos] or None,
            # load_video already picked the frames and applied the per-video pixel budget (what
            # cap_pixels_per_frame asks for); Qwen3-VL's processor would otherwise sample frames again.
            videos_kwargs={"do_resize": False, "cap_pixels_per_frame": True, "do_sample_frames": False},
            padding=True,
            padding_side=padding_side,
            return_tensors="pt",
        )
        batch.pop("video_metadata", None)  # Qwen3-VL's processor hands it back; it is no model input
        return batch

    def __call__(self, samples: list[Sample]) -> dict:
        """The batch, and under "bad_samples" one line for each sample whose media failed to load
        (left out of the batch; the loop decides whether that stops the run)."""
        kept, media, bad = [], [], []
        for sample in samples:
            try:
                media.append(self.media(sample.messages))
                kept.append(sample)
            except MediaError as e:
                bad.append(f"{sample.where}: {'video' if isinstance(e, VideoError) else 'image'} {e}")
        return {**self.batch([sample.messages for sample in kept], media), "bad_samples": bad}

    def batch(self, conversations: list[list[dict]], media: list) -> dict:
        """The batch of these conversations, with their media already loaded (Collator.media), and labels."""
        if not conversations:  # every sample failed: one padding token that trains nothing keeps the step going
            pad = self.processor.tokenizer.pad_token_id
            batch = {"input_ids": torch.tensor([[pad]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
            batch["mm_token_type_ids"] = torch.zeros(1, 1, dtype=torch.long)
        else:
            batch = self.process(conversations, media=media)
        batch = dict(batch)
        # drop_overlong() kept only samples whose images end within max_length, so this cuts text alone.
        for key in TOKEN_KEYS:
            if key in batch:
                batch[key] = batch[key][:, : self.max_length]
        rows = [ids[: int(n)] for ids, n in zip(batch["input_ids"].tolist(), batch["attention_mask"].sum(1))]
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        for row, ids in enumerate(rows):
            labels[row, : len(ids)] = torch.tensor(assistant_labels(ids, self.tokens))
        batch["labels"] = labels
        if self.blank_image and "pixel_values" not in batch and "pixel_values_videos" not in batch:
            batch = self.add_blank_image(batch)
        if self.rope_index is not None:
            batch = pack(batch, self.rope_index)
        return batch

    def add_blank_image(self, batch: dict[str, torch.Tensor], at: str = "end") -> dict[str, torch.Tensor]:
        """The batch with a blank image after the first row's last token (at="start": before its first, for
        left-padded prompts that generation continues), masked out of attention and loss.

        In a distributed run every rank must run the same modules in the same order: DDP reduces
        their gradients, FSDP gathers their weights just before they run. A batch without images
        would skip the vision tower while another rank runs it; with this one it runs too, and
        contributes nothing (no token attends to the image, and it has no labels).
        """
        image_processor = self.processor.image_processor
        side = image_processor.patch_size * image_processor.merge_size
        image = image_processor(images=[Image.new("RGB", (side, side))], return_tensors="pt")
        placeholders = int(image["image_grid_thw"].prod()) // image_processor.merge_size**2
        tokens = torch.tensor(
            [self.tokens.vision_start, *[self.tokens.image_pad] * placeholders, self.tokens.vision_end]
        )
        rows = batch["input_ids"].shape[0]
        columns = {
            "input_ids": torch.full((rows, len(tokens)), self.processor.tokenizer.pad_token_id),
            "attention_mask": torch.zeros(rows, len(tokens), dtype=torch.long),
            "labels": torch.full((rows, len(tokens)), IGNORE_INDEX),
            "mm_token_type_ids": torch.zeros(rows, len(tokens), dtype=torch.long),
        }
        columns["input_ids"][0] = tokens
        # Packed, the image ends the first sample's segment instead: under causal attention no token
        # of that sample looks ahead at it, and the next sample's segment starts after it.
        columns["attention_mask"][0] = int(self.rope_index is not None)
        columns["mm_token_type_ids"][0] = (tokens == self.tokens.image_pad).long()  # 1: an image token

        def join(value, column):
            return torch.cat([value, column] if at == "end" else [column, value], dim=1)

        batch = {k: join(v, columns[k].to(v.dtype)) if k in columns else v for k, v in batch.items()}
        return {**batch, "pixel_values": image["pixel_values"], "image_grid_thw": image["image_grid_thw"]}

    def load_video(self, part: dict) -> tuple[torch.Tensor, VideoMetadata]:
        return load_video(part["video"], self.video.for_part(part), self.video_factor)
