"""A tiny random-weight FLUX.2 klein model (base: no guidance embedding, not distilled), built locally and
saved as a normal diffusers folder that Flux2KleinPipeline.from_pretrained loads.

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
TEXT_LAYERS = 28  # more than the highest stacked index, 27

# Qwen3's chat template, reduced to what it renders for Flux2KleinPipeline's call: each message in ChatML,
# then the assistant's turn with an empty thinking block when enable_thinking is false
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def qwen_tokenizer():
    """A byte-level BPE tokenizer like Qwen3's: no BOS, <|endoftext|> as pad, ChatML's special tokens, every
    word of tiny_parts.WORDS one token, any other text in bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(tiny_parts.WORDS), "\n".join(tiny_parts.WORDS)], trainer=trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=special[1:], model_max_length=512)
    out.chat_template = CHAT_TEMPLATE
    return out


def build(path: Path, preset: str = "default", seed: int = 0) -> None:
    """Build a tiny random-weight Flux2KleinPipeline at `path` (replacing a previous build there)."""
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from diffusers import Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = tiny_parts.check_target(path, preset, PRESETS)
    p = dict(PRESETS[preset])
    d = p.pop("text_width")
    tokenizer = qwen_tokenizer()

    torch.manual_seed(seed + 0)
    # 4 latent channels patchified 2x2: 16 in; the joint attention reads three stacked Qwen3 layers
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, joint_attention_dim=3 * d,
                                          guidance_embeds=False, **p)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64,
    )
    vae.bn.running_mean.copy_(torch.randn(16) * 0.2)
    vae.bn.running_var.copy_(torch.rand(16) + 0.5)
    torch.manual_seed(seed + 2)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=d, intermediate_size=2 * d, num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=d // 2, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
    # FLUX.2's scheduler: no fixed shift in training, the pipeline's empirical mu at inference
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
    )
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=False)
    tiny_parts.save_pipeline(pipe, path)
