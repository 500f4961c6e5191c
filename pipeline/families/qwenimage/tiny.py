"""A tiny random-weight Qwen-Image model, built locally and saved as a normal diffusers folder that
QwenImagePipeline.from_pretrained loads: a Qwen2.5-VL text encoder (its language model 16 wide, a
two-layer vision tower that the pipeline never calls), a 3D-causal AutoencoderKLQwenImage that downsamples
8x as the real one does, and a QwenImageTransformer2DModel.

The pipeline formats every prompt into its own template and drops the template's first 34 tokens
(`prompt_template_encode_start_idx`). The tokenizer here makes every word of that template one token, as
Qwen2.5's does, so those 34 tokens are exactly the system prompt and the user turn's opening: the build
checks it. The VAE's latents_mean/latents_std (one per latent channel) are drawn away from (0, 1), so the
normalisation is exercised.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.families import tiny_parts

PRESETS = {
    # a ~50k-parameter transformer: seconds per test on a CPU
    "default": dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6),
                    text_width=16),
    # a few million parameters: timings mean something
    "bench": dict(num_layers=4, attention_head_dim=32, num_attention_heads=8, axes_dims_rope=(8, 12, 12),
                  text_width=64),
}
LATENT_CHANNELS = 4


def qwen_tokenizer(template: str):
    """A byte-level BPE tokenizer like Qwen2.5's: no BOS, <|endoftext|> as pad, ChatML's special tokens, every
    word of the pipeline's template and of tiny_parts.WORDS one token, any other text in bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(tiny_parts.WORDS), "\n".join(tiny_parts.WORDS), template.replace("{}", "")]
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=special[1:], model_max_length=2048)


def build(path: Path, preset: str = "default", seed: int = 0) -> None:
    """Build a tiny random-weight QwenImagePipeline at `path` (replacing a previous build there)."""
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from diffusers import QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    path = tiny_parts.check_target(path, preset, PRESETS)
    p = dict(PRESETS[preset])
    d = p.pop("text_width")
    # the template and the count of its tokens dropped are set in the pipeline's __init__: read them there
    bare = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    template, drop = bare.prompt_template_encode, bare.prompt_template_encode_start_idx
    tokenizer = qwen_tokenizer(template)
    prefix = template.split("{}")[0]
    if len(tokenizer(prefix).input_ids) != drop:  # the pipeline drops exactly these
        raise RuntimeError(f"the tiny tokenizer gives the template's prefix {len(tokenizer(prefix).input_ids)} "
                           f"tokens, not the {drop} the pipeline drops")

    torch.manual_seed(seed + 0)
    # 2x2 patches of the VAE's channels in, the channels out; joint attention over the text encoder's width
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=4 * LATENT_CHANNELS,
                                              out_channels=LATENT_CHANNELS, joint_attention_dim=d, **p)
    torch.manual_seed(seed + 1)
    # three downsamplings (8x, as the real VAE), the temporal ones on a single frame change nothing
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[round(float(x), 4) for x in torch.randn(LATENT_CHANNELS) * 0.3],
        latents_std=[round(float(x), 4) for x in torch.rand(LATENT_CHANNELS) + 0.5],
    )
    torch.manual_seed(seed + 2)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=d, intermediate_size=2 * d, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [d // 16, d // 16, d // 8]},  # half a head
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=d,
                           fullatt_block_indexes=[1]),
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
    # Qwen/Qwen-Image scheduler/scheduler_config.json: shifted by resolution at inference, to a terminal 0.02
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
    tiny_parts.save_pipeline(pipe, path)
