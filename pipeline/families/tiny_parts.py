"""What the families' tiny random-weight models share: tokenizers whose vocabulary holds the synthetic
captions' words, a small VAE, the preset and folder checks, and atomic saving. Each family's own builder is
`pipeline/families/<name>/tiny.py`; the synthetic data set and [embedded] are `pipeline/tiny.py`.

Nothing is downloaded: every component is constructed from a config, seeded, and saved as a normal
diffusers folder, so the whole trainer can run end to end on any machine (tests, CPU demos, benchmarks).
Builders write into a temporary sibling folder and rename it into place, so an interrupted build
never leaves a half folder behind, and all are deterministic (same seed -> same bytes).
"""

from __future__ import annotations

import os
import shutil
import string
from pathlib import Path

# The synthetic captions' words first, then common English words: in both tokenizers each of these is
# one token. Anything else still tokenizes (CLIP: byte-level pieces, T5: letters, else <unk>).
WORDS = """a photo of sks teapot on the table side view close up small round tall wide
red orange yellow green blue purple pink brown white black gray grey wooden dark light
and or in at with to for from by is it this that an as be are was were has have
picture image painting drawing render style cat dog person man woman car house tree
sky water cup mug kettle pot bowl plate vase flower kitchen shelf background
left right top bottom front back big old new shiny matte ceramic metal glass
one two three four five six seven eight nine ten""".split()

def clip_tokenizer():
    """A byte-level BPE CLIP tokenizer whose merges turn every word in WORDS into one token."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())  # all 256 bytes, so no input is ever unknown
    tokens = ["<|startoftext|>", "<|endoftext|>"] + alphabet + [c + "</w>" for c in alphabet]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in WORDS:
        # Run BPE as the tokenizers library does (lowest rank first, then leftmost); where it gets stuck,
        # append a merge. An appended merge has the lowest priority, so words already done stay one token.
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = list(zip(parts, parts[1:]))
            known = [(ranks[pair], i) for i, pair in enumerate(pairs) if pair in ranks]
            if known:
                i = min(known)[1]
            else:
                i = 0
                ranks[pairs[0]] = len(merges)
                merges.append(pairs[0])
                vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
    # In transformers 5 the class rebuilds CLIP's normalizer/pre-tokenizer/post-processor itself around
    # vocab + merges (also on reload from tokenizer.json), so those are all we pass.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def t5_tokenizer():
    """A Unigram T5 tokenizer: '▁word' for every word, single characters as a fallback, </s> appended."""
    from transformers import T5Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -2.0}  # T5's ids: pad 0, eos 1, unk 2
    pieces.update({"▁" + w: -5.0 for w in WORDS if "▁" + w not in pieces})
    for c in chars:  # a whole word (-5) always scores above spelling it out (<= -15)
        pieces.setdefault("▁" + c, -7.0)
        pieces.setdefault(c, -8.0)
    return T5Tokenizer(vocab=list(pieces.items()), extra_ids=0, model_max_length=512)


def check_target(path: Path, preset: str, presets: dict) -> Path:
    """Refuse an unknown preset, and a folder that holds something other than a diffusers model."""
    if preset not in presets:
        raise ValueError(f"unknown tiny model preset '{preset}' (known: {', '.join(presets)})")
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not (path / "model_index.json").exists():
        raise FileExistsError(f"'{path}' exists and is not a diffusers model folder; not overwriting it")
    return path


def tiny_vae(block_out_channels=(8, 16, 16, 16), latent_channels=4, **family_settings):
    """A 4-block AutoencoderKL (scale factor 8, like the real ones), by default with 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=64, **family_settings,
    )


def save_pipeline(pipe, path: Path) -> None:
    """save_pretrained into a temporary sibling, then into place: an interrupted build leaves no half folder."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    _move_into_place(tmp, path)


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`; an existing `path` is swapped out first and deleted only afterwards."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
