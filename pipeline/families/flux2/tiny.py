"""A tiny random-weight FLUX.2 klein model (base: no guidance embedding, not distilled), built locally and
saved as a normal diffusers folder that Flux2KleinPipeline.from_pretrained loads; preset "dev" builds
FLUX.2 dev's layout instead (Flux2Pipeline: a guidance embedding, a Mistral 3 text encoder).

Its Qwen3 has 28 layers, 16 wide: Flux2KleinPipeline stacks the hidden states of layers 9, 18 and 27 (its
fixed default), and a layer 27 that is not the last keeps hidden_states[27] a plain layer output as in
the real 36-layer Qwen3 (transformers applies the final norm to the last one). Its tokenizer carries the
chat template the pipeline applies (Qwen3's, for a user message with the generation prompt and thinking
off). The VAE's batch-norm statistics are drawn away from (0, 1), so the normalisation is exercised.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.families import tiny_parts

PRESETS = {
    # a ~0.1M-parameter transformer: seconds per test on a CPU
    "default": dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                    axes_dims_rope=(4, 4, 4, 4), text_width=16),
    # a few million parameters: timings mean something
    "bench": dict(num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=8,
                  axes_dims_rope=(8, 8, 8, 8), text_width=64),
}
# FLUX.2 dev's layout at the default's size (Flux2Pipeline): guidance embedded, Mistral 3 text encoder
PRESETS["dev"] = dict(PRESETS["default"])
TEXT_LAYERS = 28  # more than the highest stacked index, 27
# dev stacks Mistral's layers 10, 20 and 30: a 31st keeps hidden_states[30] a plain layer output (the
# real Mistral Small 3.1 has 40)
DEV_TEXT_LAYERS = 31

# Qwen3's chat template, reduced to what it renders for Flux2KleinPipeline's call: each message in ChatML,
# then the assistant's turn with an empty thinking block when enable_thinking is false
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


# Mistral Small 3.1's chat template (its [SYSTEM_PROMPT] and [INST] turns), reduced to what it renders for
# Flux2Pipeline's call: BOS, the system message, one user message whose content is a list of text parts
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('') %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{ '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{ text + eos_token }}{%- endif %}{%- endfor %}"
)


def _bpe(special: list[str]):
    """A byte-level BPE over tiny_parts.WORDS (each word one token, any other text in bytes) with `special`
    as its first tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(tiny_parts.WORDS), "\n".join(tiny_parts.WORDS)], trainer=trainer)
    return tok


def qwen_tokenizer():
    """A byte-level BPE tokenizer like Qwen3's: no BOS, <|endoftext|> as pad, ChatML's special tokens, every
    word of tiny_parts.WORDS one token, any other text in bytes."""
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    out = PreTrainedTokenizerFast(tokenizer_object=_bpe(special), eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=special[1:], model_max_length=512)
    out.chat_template = CHAT_TEMPLATE
    return out


def mistral_tokenizer():
    """A byte-level BPE tokenizer like Mistral's tekken: <s>, </s>, <pad>, the instruction and system-prompt
    markers. Flux2Pipeline's system message is one token here (an added token), so that a caption still fits
    in the tiny configs' 32 tokens after it; the real tokenizer spends about 30 on it."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"]
    tok = _bpe(special)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", additional_special_tokens=special[4:], model_max_length=512)
    out.add_tokens([SYSTEM_MESSAGE])
    out.chat_template = MISTRAL_CHAT_TEMPLATE
    return out


def mistral3(tokenizer, d: int):
    """A tiny Mistral3ForConditionalGeneration (Mistral Small 3.1's class: a Mistral language model and a
    Pixtral vision tower that text-only prompts never run)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    return Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=d, intermediate_size=2 * d,
                         num_hidden_layers=DEV_TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=d // 2, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(model_type="pixtral", hidden_size=d, intermediate_size=2 * d, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=d // 2, image_size=28, patch_size=14),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2,
    ))


def build(path: Path, preset: str = "default", seed: int = 0) -> None:
    """Build a tiny random-weight Flux2KleinPipeline (preset "dev": Flux2Pipeline) at `path` (replacing a
    previous build there)."""
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline
    from diffusers import Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = tiny_parts.check_target(path, preset, PRESETS)
    p = dict(PRESETS[preset])
    d = p.pop("text_width")
    dev = preset == "dev"
    tokenizer = mistral_tokenizer() if dev else qwen_tokenizer()

    torch.manual_seed(seed + 0)
    # 4 latent channels patchified 2x2: 16 in; the joint attention reads three stacked text-encoder layers
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, joint_attention_dim=3 * d,
                                          guidance_embeds=dev, **p)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64,
    )
    vae.bn.running_mean.copy_(torch.randn(16) * 0.2)
    vae.bn.running_var.copy_(torch.rand(16) + 0.5)
    torch.manual_seed(seed + 2)
    text_encoder = mistral3(tokenizer, d) if dev else Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=d, intermediate_size=2 * d, num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=d // 2, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
    # FLUX.2's scheduler: no fixed shift in training, the pipeline's empirical mu at inference
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
    )
    parts = dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe = Flux2Pipeline(**parts) if dev else Flux2KleinPipeline(**parts, is_distilled=False)
    tiny_parts.save_pipeline(pipe, path)
