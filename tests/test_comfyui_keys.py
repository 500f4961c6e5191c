"""Every LoRA file the project writes loads in ComfyUI as it loads in diffusers, checked through a model of
ComfyUI's key mapping written from its naming rules (comfyui_rules.py):

- at full size (FLUX.1-dev, SDXL base, HiDream-I1, Chroma1-HD and Z-Image built on the meta device from their public configs,
  only the LoRA's own tensors real): for each target preset and format, every key of the file maps to a
  weight of ComfyUI's model, and the update ComfyUI applies is the trained one, alpha/rank included;
- the model's own Flux and SDXL layouts are what diffusers' single-file readers take (Black Forest Labs'
  layout, row by row; the ldm UNet);
- on the tiny models, with real weights: the written file, patched by ComfyUI's rules, gives the weights
  that diffusers' load_lora_weights gives.
"""

import json

import pytest
import torch
from diffusers import (ChromaTransformer2DModel, FluxTransformer2DModel, HiDreamImageTransformer2DModel,
                       QwenImageTransformer2DModel, UNet2DConditionModel, ZImageTransformer2DModel)
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers, convert_hidream_transformer_to_diffusers,
    convert_ldm_unet_checkpoint,
)
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

import comfyui_rules as comfy
from conftest import CPU32
from pipeline.config import LoraConfig, ModelConfig
from pipeline.families import family_class
from pipeline.families.base import load_full_pipeline
from pipeline.families.chroma.planning import DENOISER as CHROMA1_HD
from pipeline.families.qwenimage.planning import DENOISER as QWEN_IMAGE
from pipeline.families.sdxl.kohya import ldm_unet_name
from pipeline.families.zimage.planning import DENOISER as Z_IMAGE
from pipeline.denoiser.lora import LORA_LAYERS, add_lora, diffusers_weights, lora_file, save_lora

# the public configs of the full-size denoisers (transformer/ or unet/config.json of each repository)
FLUX1_DEV = dict(attention_head_dim=128, axes_dims_rope=[16, 56, 56], guidance_embeds=True, in_channels=64,
                 joint_attention_dim=4096, num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1,
                 pooled_projection_dim=768)
SDXL_BASE = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], center_input_sample=False,
    class_embed_type=None, class_embeddings_concat=False, conv_in_kernel=3, conv_out_kernel=3, cross_attention_dim=2048,
    cross_attention_norm=None, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1, dual_cross_attention=False, encoder_hid_dim=None, encoder_hid_dim_type=None,
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_only_cross_attention=None,
    mid_block_scale_factor=1, mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-05, norm_num_groups=32,
    num_attention_heads=None, num_class_embeds=None, only_cross_attention=False, out_channels=4,
    projection_class_embeddings_input_dim=2816, resnet_out_scale_factor=1.0, resnet_skip_time_act=False,
    resnet_time_scale_shift="default", sample_size=128, time_cond_proj_dim=None, time_embedding_act_fn=None,
    time_embedding_dim=None, time_embedding_type="positional", timestep_post_act=None,
    transformer_layers_per_block=[1, 2, 10], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    upcast_attention=None, use_linear_projection=True,
)
HIDREAM_I1 = dict(attention_head_dim=128, axes_dims_rope=[64, 32, 32], caption_channels=[4096, 4096], in_channels=16,
                  llama_layers=list(range(32)) + [31] * 16, max_resolution=[128, 128], num_activated_experts=2,
                  num_attention_heads=20, num_layers=16, num_routed_experts=4, num_single_layers=32, out_channels=16,
                  patch_size=2, text_emb_dim=2048)
FULL_SIZE = {"flux": (FluxTransformer2DModel, FLUX1_DEV), "sdxl": (UNet2DConditionModel, SDXL_BASE),
             "hidream": (HiDreamImageTransformer2DModel, HIDREAM_I1),
             "chroma": (ChromaTransformer2DModel, {k: v for k, v in CHROMA1_HD.items() if k != "_class_name"}),
             "qwenimage": (QwenImageTransformer2DModel, {k: v for k, v in QWEN_IMAGE.items() if k != "_class_name"}),
             "zimage": (ZImageTransformer2DModel, {k: v for k, v in Z_IMAGE.items() if k != "_class_name"})}
# every family, preset and format; Flux's kohya layout (Chroma's too) refuses all_linear (test_lora_format.py)
PRESETS, FORMATS = ("attention", "attention_mlp", "all_linear"), ("diffusers", "kohya")
CASES = [(f, p, fmt) for f in FULL_SIZE for p in PRESETS for fmt in FORMATS
         if (p, fmt) != ("all_linear", "kohya") or f not in ("flux", "chroma")]
RANK, ALPHA = 4, 8.0  # alpha != rank: the strength must survive


def family_for(name, root, config):
    """The family object, over a folder holding only the denoiser's config (what its LoRA export reads)."""
    fam_cls = family_class(name)
    (root / fam_cls.denoiser_component).mkdir(parents=True, exist_ok=True)
    (root / fam_cls.denoiser_component / "config.json").write_text(json.dumps(config))
    return fam_cls(root, ModelConfig(path=str(root)))


def targets_of(name, model, config):
    """ComfyUI's place for each Linear and Conv2d of the diffusers model (before its LoRA is added)."""
    modules = [n for n, m in model.named_modules() if isinstance(m, LORA_LAYERS)]
    if name == "flux":
        return comfy.flux_targets(config)
    if name == "chroma":  # FLUX.1's table, on the Linears Chroma has
        return {d: t for d, t in comfy.flux_targets(config).items() if d in modules}
    if name == "sdxl":
        return comfy.sdxl_targets(modules, config)
    if name == "qwenimage":
        return comfy.qwenimage_targets(modules)
    if name == "zimage":
        return comfy.zimage_targets(config)
    return comfy.hidream_targets(modules)


def meta_model_with_lora(name, preset, seed=0, **lora):
    """The full-size denoiser on the meta device with a LoRA whose tensors are real (B not zero)."""
    cls, config = FULL_SIZE[name]
    with torch.device("meta"):
        model = cls.from_config(config)
    cfg = LoraConfig(rank=RANK, alpha=ALPHA, targets=preset, **lora)
    targets = targets_of(name, model, config)
    add_lora(model, cfg, family_class(name).target_presets)
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        for lin in (layer.lora_A["default"], layer.lora_B["default"]):
            lin.weight = torch.nn.Parameter(torch.randn(lin.weight.shape, generator=g) * 0.1)
        if cfg.use_dora:
            magnitude = layer.lora_magnitude_vector["default"]
            magnitude.weight = torch.nn.Parameter(torch.ones(magnitude.weight.shape))
    return model, cfg, targets


def lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def trained_times(model, targets, probes, rows):
    """What the trained LoRA adds to each ComfyUI weight, times its probe: scale * B @ (A @ x), placed in
    ComfyUI's rows."""
    out = {w: torch.zeros(n) for w, n in rows.items()}
    for name, layer in lora_layers(model).items():
        t = targets[name]
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        y = layer.scaling["default"] * (b @ (a @ probes[t.weight]))
        comfy.rows_of(out[t.weight], t).add_(comfy.swapped(y, t))
    return out


def probes_for(model, targets, patches, seed=1):
    """A random input per patched ComfyUI weight, and each such weight's row count."""
    shapes = {n: m.weight.shape for n, m in model.named_modules() if n in targets}
    rows, fan_in = {}, {}
    for d, t in targets.items():
        out_rows = t.rows[0] + t.rows[1] if t.rows else shapes[d][0]
        rows[t.weight] = max(rows.get(t.weight, 0), out_rows)
        fan_in[t.weight] = shapes[d][1:].numel()
    g = torch.Generator().manual_seed(seed)
    touched = sorted({p.target.weight for p in patches})
    return {w: torch.randn(fan_in[w], generator=g) for w in touched}, {w: rows[w] for w in touched}


@pytest.mark.parametrize("name,preset,fmt", CASES)
def test_every_key_loads_in_comfyui_at_full_size_with_the_trained_strength(name, preset, fmt, tmp_path):
    model, cfg, targets = meta_model_with_lora(name, preset)
    fam = family_for(name, tmp_path, FULL_SIZE[name][1])
    weights, _ = lora_file(model, fam, cfg, fmt)
    # comfy/lora_convert.py rewrites files of a few other trainers, recognised by such top-level keys
    assert not any(k.startswith(("t_embedder.", "img_in.", "single_blocks.", "lora_unet__")) for k in weights)
    patches, unloaded = comfy.load(weights, comfy.key_map(name, targets))
    assert not unloaded, sorted(unloaded)[:5]
    assert 2 * len(patches) + sum(k.endswith(".alpha") for k in weights) == len(weights)

    probes, rows = probes_for(model, targets, patches)
    ours, theirs = trained_times(model, targets, probes, rows), comfy.patch_times(patches, probes, rows)
    assert set(theirs) == set(ours)
    for w in ours:
        assert (theirs[w] - ours[w]).norm() <= 1e-5 * ours[w].norm(), w


def test_peft_names_and_alpha_in_metadata_alone_are_what_comfyui_misreads():
    """The model finds what the issue reports of the former diffusers files (peft's names, scale only in
    lora_adapter_metadata): SDXL's attention maps nowhere, and Flux's loads at half strength."""
    model, _, targets = meta_model_with_lora("sdxl", "attention")
    peft_file = diffusers_weights(model, "unet")
    patches, unloaded = comfy.load(peft_file, comfy.key_map("sdxl", targets))
    assert (len(patches), len(unloaded)) == (0, 1120)

    model, _, targets = meta_model_with_lora("flux", "attention")
    patches, unloaded = comfy.load(diffusers_weights(model, "transformer"), comfy.key_map("flux", targets))
    assert patches and not unloaded
    probes, rows = probes_for(model, targets, patches)
    ours, theirs = trained_times(model, targets, probes, rows), comfy.patch_times(patches, probes, rows)
    for w in ours:
        torch.testing.assert_close(theirs[w], ours[w] * RANK / ALPHA)


def test_dora_magnitudes_do_not_load_in_comfyui(tmp_path):
    """A DoRA file loads in diffusers only (the trainer warns): ComfyUI reads peft's magnitudes nowhere."""
    model, cfg, targets = meta_model_with_lora("sdxl", "attention", use_dora=True)
    weights, _ = lora_file(model, family_for("sdxl", tmp_path, SDXL_BASE), cfg, "diffusers")
    _, unloaded = comfy.load(weights, comfy.key_map("sdxl", targets))
    assert unloaded and all(k.endswith(".lora_magnitude_vector") for k in unloaded)


def test_comfyui_layouts_are_what_diffusers_reads_from_single_files():
    """The model's ComfyUI layouts: Flux's targets, row by row, are where diffusers' reader of BFL files
    takes each diffusers weight from; the ldm names are what its SDXL reader renames; HiDream's reader only
    drops the prefix."""
    with torch.device("meta"):
        flux = FluxTransformer2DModel.from_config(FLUX1_DEV)
    targets = comfy.flux_targets(FLUX1_DEV)
    assert set(targets) == {n for n, m in flux.named_modules() if isinstance(m, torch.nn.Linear)}
    shapes = {n: m.weight.shape for n, m in flux.named_modules() if n in targets}
    rows = {}  # BFL weight -> its row count
    for d, t in targets.items():
        rows[t.weight] = max(rows.get(t.weight, 0), t.rows[0] + t.rows[1] if t.rows else shapes[d][0])
    # each BFL row holds its own global number, so the converted weights tell where they came from
    bfl, first = {}, {}
    for w, n in sorted(rows.items()):
        first[w] = sum(rows[v] for v in sorted(rows) if v < w)
        ids = torch.arange(first[w], first[w] + n, dtype=torch.float64)
        bfl[w.removeprefix("diffusion_model.")] = ids[:, None]
        bfl[w.removeprefix("diffusion_model.").replace(".weight", ".bias")] = ids

    class Checkpoint(dict):  # the RMSNorm scales, which no LoRA targets, as placeholders
        def pop(self, key, *default):
            return super().pop(key) if key in self else torch.zeros(1)

    converted = convert_flux_transformer_checkpoint_to_diffusers(Checkpoint(bfl))
    for d, t in targets.items():
        start, n = t.rows if t.rows else (0, rows[t.weight])
        want = torch.arange(first[t.weight] + start, first[t.weight] + start + n, dtype=torch.float64)
        assert torch.equal(converted[f"{d}.weight"][:, 0], comfy.swapped(want, t)), d

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SDXL_BASE)
    sd = unet.state_dict()
    ldm = {f"model.diffusion_model.{ldm_unet_name(k, SDXL_BASE)}": v for k, v in sd.items()}
    assert set(convert_ldm_unet_checkpoint(ldm, SDXL_BASE)) == set(sd)

    with torch.device("meta"):
        hidream = HiDreamImageTransformer2DModel.from_config(HIDREAM_I1)
    sd = hidream.state_dict()
    assert set(convert_hidream_transformer_to_diffusers({f"model.diffusion_model.{k}": v for k, v in sd.items()})) == set(sd)


# Chroma's kohya file on the tiny model: its double blocks load in test_chroma.py (diffusers splits a single
# block's linear1 only at FLUX.1's widths); the full-size check above maps every key
@pytest.mark.parametrize("name,fmt", [(f, fmt) for f in FULL_SIZE for fmt in FORMATS if (f, fmt) != ("chroma", "kohya")])
def test_comfyui_rules_on_a_written_file_give_the_weights_diffusers_loads(
    name, fmt, tiny_family_model, tiny_flux_double_only, tmp_path
):
    root = tiny_flux_double_only if (name, fmt) == ("flux", "kohya") else tiny_family_model(name)
    fam = family_class(name)(root, ModelConfig(path=str(root)))
    preset = "attention_mlp" if name == "flux" and fmt == "kohya" else "all_linear"
    model = fam.load_denoiser(**CPU32)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    config = json.loads((root / fam.denoiser_component / "config.json").read_text())
    targets = targets_of(name, model, config)
    cfg = LoraConfig(rank=RANK, alpha=ALPHA, targets=preset)
    add_lora(model, cfg, fam.target_presets)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # B starts at zero
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = tmp_path / "lora.safetensors"
    save_lora(path, model, fam, {}, cfg, fmt)

    patches, unloaded = comfy.load(load_file(path), comfy.key_map(name, targets))
    assert patches and not unloaded
    ours = comfy.merge(comfy.to_comfy(base, targets), patches)

    pipe = load_full_pipeline(fam, **CPU32)
    pipe.load_lora_weights(str(path), adapter_name="file")
    denoiser = getattr(pipe, fam.denoiser_component)
    merged = dict(base)
    for n, layer in lora_layers(denoiser).items():
        merged[f"{n}.weight"] = layer.base_layer.weight + layer.get_delta_weight("file")
    theirs = comfy.to_comfy(merged, targets)
    for w in {p.target.weight for p in patches}:
        assert not torch.equal(ours[w], comfy.to_comfy(base, targets)[w]), w  # the LoRA changes it
        torch.testing.assert_close(ours[w], theirs[w], rtol=1e-5, atol=1e-6)
