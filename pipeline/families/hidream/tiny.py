"""A tiny random-weight HiDream-I1-architecture model, built locally like the tiny Flux model.

Every component of HiDreamImagePipeline is there, in miniature: the MoE transformer, two CLIP text
encoders with projection (pooled), a T5 encoder, a Llama causal LM (all its hidden states feed the
transformer) with a locally trained byte-level BPE tokenizer, and a Flux-style VAE. Saved with
save_pretrained, text_encoder_4/tokenizer_4 included, so HiDreamImagePipeline.from_pretrained loads it
with no extra arguments.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.families import tiny_parts
from pipeline.families.flux.tiny import FLUX_VAE

PRESETS = {
    # ~0.3M-parameter transformer (most of it the MoE feed-forwards): seconds per test on a CPU.
    "default": dict(
        num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(8, 4, 4),
        hidden=32, llama_layers=2,
    ),
    # a few million parameters: timings mean something.
    "bench": dict(
        num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4, axes_dims_rope=(16, 8, 8),
        hidden=64, llama_layers=4,
    ),
}


def llama_tokenizer():
    """A byte-level BPE tokenizer like Llama 3's: <|begin_of_text|> prepended, <|end_of_text|> as eos and pad,
    every word of tiny_parts.WORDS one token (with or without a leading space), any other text spelled in bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, special_tokens=[bos, eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # words after a space ("Ġword") and at the start of a text ("word"); training is deterministic
    tok.train_from_iterator([" ".join(tiny_parts.WORDS), "\n".join(tiny_parts.WORDS)], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos, model_max_length=512)


def build(path: Path, preset: str = "default", seed: int = 0) -> None:
    """Build a tiny random-weight HiDreamImagePipeline at `path` (replacing a previous build there)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline
    from diffusers import HiDreamImageTransformer2DModel
    from transformers import (
        CLIPTextConfig, CLIPTextModelWithProjection, LlamaConfig, LlamaForCausalLM, T5Config, T5EncoderModel,
    )

    path = tiny_parts.check_target(path, preset, PRESETS)
    p = PRESETS[preset]
    d = p["hidden"]  # T5 and Llama width; each CLIP projects to d/2, so the pooled embedding is d wide
    clip_tok, t5_tok, llama_tok = tiny_parts.clip_tokenizer(), tiny_parts.t5_tokenizer(), llama_tokenizer()
    blocks = p["num_layers"] + p["num_single_layers"]

    torch.manual_seed(seed + 0)
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=p["num_layers"], num_single_layers=p["num_single_layers"],
        attention_head_dim=p["attention_head_dim"], num_attention_heads=p["num_attention_heads"],
        caption_channels=[d, d], text_emb_dim=d, num_routed_experts=3, num_activated_experts=2,  # top-2 like I1
        axes_dims_rope=p["axes_dims_rope"], max_resolution=(16, 16),  # 128 px: room for non-square buckets
        # one Llama layer per block, the last one repeated, as I1 does with its 48 blocks over 32 layers
        llama_layers=[min(i, p["llama_layers"] - 1) for i in range(blocks)],
    )
    torch.manual_seed(seed + 1)
    vae = tiny_parts.tiny_vae(**FLUX_VAE)  # HiDream uses Flux's VAE

    def clip(seed_offset: int):
        torch.manual_seed(seed + seed_offset)
        # 248 positions like HiDream's long-context CLIPs (the pipeline pads CLIP to min(max_sequence_length, 218))
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=d, projection_dim=d // 2, intermediate_size=2 * d,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=248,
            bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id,
        ))

    text_encoder, text_encoder_2 = clip(2), clip(3)
    torch.manual_seed(seed + 4)
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=d, d_kv=d // 4, d_ff=2 * d, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=0,
    ))
    torch.manual_seed(seed + 5)
    text_encoder_4 = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(llama_tok), hidden_size=d, intermediate_size=2 * d, num_hidden_layers=p["llama_layers"],
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,  # grouped-query like Llama 3
        bos_token_id=llama_tok.bos_token_id, eos_token_id=llama_tok.eos_token_id, pad_token_id=llama_tok.pad_token_id,
        tie_word_embeddings=False,
    ))
    # a fixed shift of 3.0 and no dynamic shifting, as HiDream-I1-Full (flow_shift 3.0) and -Fast
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = HiDreamImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tok,
        text_encoder_2=text_encoder_2, tokenizer_2=clip_tok, text_encoder_3=text_encoder_3, tokenizer_3=t5_tok,
        text_encoder_4=text_encoder_4, tokenizer_4=llama_tok, transformer=transformer,
    )
    tiny_parts.save_pipeline(pipe, path)
