"""Every checkpoint naming style ldm_engine reads, mapped to the canonical (diffusers /
published-transformers) state-dict keys — all in this one module.

Styles:
- diffusers folders: canonical already; old VAE and UNet2DModel attention names (query/key/value/proj_attn).
- transformers CLIP: with the ``text_model.`` prefix (published files) or without it
  (transformers >= 5.6 CLIPTextModel); stale ``position_ids`` buffers.
- OpenCLIP (SD2.x / SD-Turbo text encoder, SDXL's bigG): fused in_proj, ln_1/ln_2, c_fc/c_proj,
  transposed text_projection, one extra resblock in SD2 (its penultimate-layer convention).
- ldm / sgm single files: U-Net ``input_blocks/middle_block/output_blocks`` indices, VAE
  ``encoder.down.i.block.j`` / reversed ``decoder.up.i``, 1x1-conv VAE attention, ControlNet
  ``input_hint_block`` / ``zero_convs`` / ``middle_block_out``.
- original TAESD / TAESDXL files: one nn.Sequential per file (``taesd_encoder`` / ``taesd_decoder``),
  the decoder's indices shifted by its leading Clamp.

A mapper takes a source key (component prefix already removed) and its shape and returns a
list of ``Target`` (usually one; three for a fused qkv), ``IGNORE`` for tensors that are known
not to belong to the model, or ``None`` when it does not recognise the key (reported as
unexpected). The ldm U-Net / ControlNet / VAE index tables are derived from the component's
config (layers per block, block types, attention presence), not written out per family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence


@dataclass(frozen=True)
class Target:
    """A canonical key and how to derive its tensor from the stored one.

    op: ``()`` as stored; ``("chunk", i, n)`` the i-th of n equal parts along dim 0 (fused
    qkv); ``("t",)`` transposed; ``("squeeze",)`` [C, C, 1, 1] conv kernel to a [C, C] linear
    weight.
    """

    key: str
    op: tuple = ()


IGNORE: list[Target] = []  # a known tensor with no place in the model (an empty target list)

KeyMapper = Callable[[str, Sequence[int]], "list[Target] | None"]


def target_shape(shape: Sequence[int], op: tuple) -> tuple[int, ...]:
    shape = tuple(shape)
    if not op:
        return shape
    if op[0] == "chunk":
        n = op[2]
        if not shape or shape[0] % n:
            return (-1,)  # cannot be split: reported as a wrong shape
        return (shape[0] // n, *shape[1:])
    if op[0] == "t":
        return tuple(reversed(shape)) if len(shape) == 2 else (-1,)
    if op[0] == "squeeze":
        return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape
    raise ValueError(f"unknown op {op!r}")


def apply_op(tensor, op: tuple):
    if not op:
        return tensor
    if op[0] == "chunk":
        _, i, n = op
        part = tensor.shape[0] // n
        # A clone, so that q/k/v do not share (and pin) the fused tensor's storage.
        return tensor[i * part:(i + 1) * part].clone()
    if op[0] == "t":
        return tensor.t().contiguous()
    if op[0] == "squeeze":
        return tensor.reshape(tensor.shape[:2]) if tensor.dim() == 4 else tensor
    raise ValueError(f"unknown op {op!r}")


# ----------------------------------------------------------------------------------------------
# Config access: the models' config dataclasses and plain config.json dicts both work.

def _cfg(config: Any, name: str, default=None):
    if isinstance(config, dict):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    return default if value is None else value


def _per_block(value, n: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * n


# ----------------------------------------------------------------------------------------------
# Canonical (diffusers / transformers) names.

def diffusers_key(key: str, shape: Sequence[int] = ()) -> list[Target]:
    """U-Net / ControlNet keys in a diffusers folder: canonical as stored."""
    return [Target(key)]


_OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def diffusers_vae_key(key: str, shape: Sequence[int] = ()) -> list[Target]:
    """VAE keys in a diffusers folder. Folders saved by diffusers < 0.14 (the SD1.5 repo's VAE
    among them) name the mid-block attention query/key/value/proj_attn."""
    parts = key.split(".")
    if len(parts) >= 5 and parts[-4] == "attentions" and parts[-2] in _OLD_VAE_ATTENTION:
        parts[-2] = _OLD_VAE_ATTENTION[parts[-2]]
        return [Target(".".join(parts), ("squeeze",))]
    return [Target(key)]


# The pixel-space UNet2DModel (DDPM) names its attention blocks as the VAE does, old names included.
diffusers_unet_2d_key = diffusers_vae_key

_CLIP_INNER_PREFIXES = ("embeddings.", "encoder.", "final_layer_norm.")


def clip_key(key: str, shape: Sequence[int] = ()) -> list[Target] | None:
    """transformers CLIP keys, with or without the ``text_model.`` prefix."""
    if key.endswith("position_ids"):  # a buffer old transformers versions saved
        return IGNORE
    if key.startswith("text_model.") or key == "text_projection.weight":
        return [Target(key)]
    if key.startswith(_CLIP_INNER_PREFIXES):
        return [Target("text_model." + key)]
    return None


def open_clip_mapper(num_hidden_layers: int, *, keep_projection: bool) -> KeyMapper:
    """OpenCLIP text-tower keys -> transformers CLIP keys.

    SD2.x runs the 24-layer ViT-H tower to its penultimate layer, published as a 23-layer
    CLIPTextModel: the one resblock beyond ``num_hidden_layers`` is dropped, and so is its
    text_projection. SDXL's bigG keeps all layers and the (transposed) projection.
    """
    renames = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}

    def mapper(key: str, shape: Sequence[int] = ()) -> list[Target] | None:
        if key == "token_embedding.weight":
            return [Target("text_model.embeddings.token_embedding.weight")]
        if key == "positional_embedding":
            return [Target("text_model.embeddings.position_embedding.weight")]
        if key.startswith("ln_final."):
            return [Target("text_model.final_layer_norm." + key[len("ln_final."):])]
        if key == "text_projection":
            # open_clip computes x @ proj; a Linear computes x @ W.T, so W = proj.T.
            return [Target("text_projection.weight", ("t",))] if keep_projection else IGNORE
        if key in ("logit_scale", "attn_mask"):
            return IGNORE
        if not key.startswith("transformer.resblocks."):
            return None
        index, _, rest = key[len("transformer.resblocks."):].partition(".")
        if not index.isdigit():
            return None
        layer = int(index)
        if layer == num_hidden_layers:  # the unused last layer (SD2's penultimate convention)
            return IGNORE
        if layer > num_hidden_layers:
            return None
        base = f"text_model.encoder.layers.{layer}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]  # weight | bias
            return [Target(f"{base}self_attn.{name}_proj.{kind}", ("chunk", i, 3))
                    for i, name in enumerate(("q", "k", "v"))]
        module, _, param = rest.rpartition(".")
        if module in renames:
            return [Target(f"{base}{renames[module]}.{param}")]
        return None

    return mapper


# ----------------------------------------------------------------------------------------------
# ldm / sgm U-Net, ControlNet and VAE: module tables derived from the config.

_SAME: dict[str, str] = {}
_LDM_UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_LDM_VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
_LDM_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}

# ldm module path -> (diffusers module path, renames of the parts below it)
ModuleTable = dict[str, tuple[str, dict[str, str]]]


def _unet_encoder_table(config: Any) -> tuple[ModuleTable, int]:
    """Time/label embeddings, input_blocks and middle_block (shared by U-Net and ControlNet).
    Also returns the number of input blocks (= ControlNet zero convs)."""
    table: ModuleTable = {
        "time_embed.0": ("time_embedding.linear_1", _SAME),
        "time_embed.2": ("time_embedding.linear_2", _SAME),
        "input_blocks.0.0": ("conv_in", _SAME),
    }
    if _cfg(config, "addition_embed_type") == "text_time":
        table["label_emb.0.0"] = ("add_embedding.linear_1", _SAME)
        table["label_emb.0.2"] = ("add_embedding.linear_2", _SAME)
    down_types = list(_cfg(config, "down_block_types"))
    layers = _per_block(_cfg(config, "layers_per_block", 2), len(down_types))
    index = 1
    for i, block_type in enumerate(down_types):
        has_attention = "Attn" in block_type
        for j in range(layers[i]):
            table[f"input_blocks.{index}.0"] = (f"down_blocks.{i}.resnets.{j}", _LDM_UNET_RESNET)
            if has_attention:
                table[f"input_blocks.{index}.1"] = (f"down_blocks.{i}.attentions.{j}", _SAME)
            index += 1
        if i < len(down_types) - 1:  # every block but the last halves the resolution
            table[f"input_blocks.{index}.0.op"] = (f"down_blocks.{i}.downsamplers.0.conv", _SAME)
            index += 1

    mid_type = _cfg(config, "mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type is not None:
        table["middle_block.0"] = ("mid_block.resnets.0", _LDM_UNET_RESNET)
        if "Attn" in mid_type:
            table["middle_block.1"] = ("mid_block.attentions.0", _SAME)
            table["middle_block.2"] = ("mid_block.resnets.1", _LDM_UNET_RESNET)
        else:
            table["middle_block.1"] = ("mid_block.resnets.1", _LDM_UNET_RESNET)
    return table, index


def unet_ldm_table(config: Any) -> ModuleTable:
    table, _ = _unet_encoder_table(config)
    down_types = list(_cfg(config, "down_block_types"))
    up_types = list(_cfg(config, "up_block_types"))
    layers = list(reversed(_per_block(_cfg(config, "layers_per_block", 2), len(down_types))))
    index = 0
    for i, block_type in enumerate(up_types):
        has_attention = "Attn" in block_type
        for j in range(layers[i] + 1):
            table[f"output_blocks.{index}.0"] = (f"up_blocks.{i}.resnets.{j}", _LDM_UNET_RESNET)
            if has_attention:
                table[f"output_blocks.{index}.1"] = (f"up_blocks.{i}.attentions.{j}", _SAME)
            if j == layers[i] and i < len(up_types) - 1:  # upsampler follows a block's last resnet
                sub = 2 if has_attention else 1
                table[f"output_blocks.{index}.{sub}.conv"] = (f"up_blocks.{i}.upsamplers.0.conv", _SAME)
            index += 1
    table["out.0"] = ("conv_norm_out", _SAME)
    table["out.2"] = ("conv_out", _SAME)
    return table


def controlnet_ldm_table(config: Any) -> ModuleTable:
    table, num_input_blocks = _unet_encoder_table(config)
    hint_channels = _cfg(config, "conditioning_embedding_out_channels", (16, 32, 96, 256))
    # ldm's hint block is Sequential(conv, SiLU, conv, SiLU, ..., zero_conv): convs at even indices.
    num_inner = 2 * (len(hint_channels) - 1)
    table["input_hint_block.0"] = ("controlnet_cond_embedding.conv_in", _SAME)
    for b in range(num_inner):
        table[f"input_hint_block.{2 * (b + 1)}"] = (f"controlnet_cond_embedding.blocks.{b}", _SAME)
    table[f"input_hint_block.{2 * (num_inner + 1)}"] = ("controlnet_cond_embedding.conv_out", _SAME)
    for k in range(num_input_blocks):
        table[f"zero_convs.{k}.0"] = (f"controlnet_down_blocks.{k}", _SAME)
    table["middle_block_out.0"] = ("controlnet_mid_block", _SAME)
    return table


def vae_ldm_table(config: Any) -> ModuleTable:
    num_blocks = len(list(_cfg(config, "down_block_types", ["DownEncoderBlock2D"] * 4)))
    layers = int(_cfg(config, "layers_per_block", 2))
    table: ModuleTable = {"quant_conv": ("quant_conv", _SAME), "post_quant_conv": ("post_quant_conv", _SAME)}
    for side in ("encoder", "decoder"):
        table[f"{side}.conv_in"] = (f"{side}.conv_in", _SAME)
        table[f"{side}.conv_out"] = (f"{side}.conv_out", _SAME)
        table[f"{side}.norm_out"] = (f"{side}.conv_norm_out", _SAME)
        table[f"{side}.mid.block_1"] = (f"{side}.mid_block.resnets.0", _LDM_VAE_RESNET)
        table[f"{side}.mid.attn_1"] = (f"{side}.mid_block.attentions.0", _LDM_VAE_ATTENTION)
        table[f"{side}.mid.block_2"] = (f"{side}.mid_block.resnets.1", _LDM_VAE_RESNET)
    for i in range(num_blocks):
        for j in range(layers):
            table[f"encoder.down.{i}.block.{j}"] = (f"encoder.down_blocks.{i}.resnets.{j}", _LDM_VAE_RESNET)
        if i < num_blocks - 1:
            table[f"encoder.down.{i}.downsample.conv"] = (f"encoder.down_blocks.{i}.downsamplers.0.conv", _SAME)
    for i in range(num_blocks):
        ldm_i = num_blocks - 1 - i  # ldm numbers the decoder's levels from the bottom up
        for j in range(layers + 1):
            table[f"decoder.up.{ldm_i}.block.{j}"] = (f"decoder.up_blocks.{i}.resnets.{j}", _LDM_VAE_RESNET)
        if i < num_blocks - 1:
            table[f"decoder.up.{ldm_i}.upsample.conv"] = (f"decoder.up_blocks.{i}.upsamplers.0.conv", _SAME)
    return table


def table_mapper(table: ModuleTable) -> KeyMapper:
    """A key mapper from a module table: the longest table entry that prefixes the key's
    module path is renamed, then the rest of the path goes through that entry's renames."""

    def mapper(key: str, shape: Sequence[int] = ()) -> list[Target] | None:
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            entry = table.get(".".join(parts[:cut]))
            if entry is None:
                continue
            new_module, renames = entry
            rest = parts[cut:]
            param = rest[-1]
            inner = ".".join(rest[:-1])
            for old, new in renames.items():  # match whole dotted components only
                if inner == old or inner.startswith(old + "."):
                    inner = new + inner[len(old):]
                    break
            new_key = ".".join(p for p in (new_module, inner, param) if p)
            op = ("squeeze",) if renames is _LDM_VAE_ATTENTION and len(shape) == 4 else ()
            return [Target(new_key, op)]
        return None

    return mapper


# ----------------------------------------------------------------------------------------------
# The original TAESD / TAESDXL files (madebyollin/taesd): ``taesd_encoder.safetensors`` and
# ``taesd_decoder.safetensors`` hold one nn.Sequential each, keys ``<index>.<rest>``; a combined
# state dict of the original ``TAESD`` module prefixes them with ``encoder.`` / ``decoder.``.
# diffusers' EncoderTiny keeps the encoder's indices; the original decoder's layer 0 is a Clamp
# module (diffusers clamps in forward()), so its layer i is diffusers' decoder.layers.{i-1}.

TAESD_LAYER_OFFSET = {"encoder": 0, "decoder": 1}


def taesd_mapper(side: str) -> KeyMapper:
    """Original TAESD ``<index>.<rest>`` keys of the ``side`` ("encoder" / "decoder") file ->
    diffusers ``AutoencoderTiny`` keys."""
    offset = TAESD_LAYER_OFFSET[side]

    def mapper(key: str, shape: Sequence[int] = ()) -> list[Target] | None:
        head, _, rest = key.partition(".")
        if not head.isdigit() or not rest or int(head) < offset:
            return None
        return [Target(f"{side}.layers.{int(head) - offset}.{rest}")]

    return mapper


def is_taesd_layout(keys, prefix: str = "") -> bool:
    """Keys of an original TAESD Sequential: every key (after ``prefix``) starts with an index."""
    keys = [k[len(prefix):] for k in keys if k.startswith(prefix)]
    return bool(keys) and all(k.split(".", 1)[0].isdigit() for k in keys)


# ----------------------------------------------------------------------------------------------
# Single-file layouts: component prefixes and family detection.

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
CONTROLNET_PREFIX = "control_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIXES = ("cond_stage_model.model.", "conditioner.embedders.0.model.")
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."
# Whole-checkpoint tensors that belong to no component we load (EMA copies, schedule buffers).
IGNORED_TOP_LEVEL_PREFIXES = ("model_ema.", "first_stage_model.loss.", "vae.loss.")


def unet_in_channels(shapes: dict[str, Sequence[int]]) -> int | None:
    """The U-Net's input channels from its first convolution (9 for inpainting models), if stored."""
    shape = shapes.get(f"{UNET_PREFIX}input_blocks.0.0.weight")
    return None if shape is None or len(shape) != 4 else int(shape[1])


def first_key_with_suffix(keys, prefix: str, suffix: str) -> str | None:
    for k in keys:
        if k.startswith(prefix) and k.endswith(suffix):
            return k
    return None


def detect_single_file_family(shapes: dict[str, Sequence[int]]) -> str:
    """'sd1' | 'sd2' | 'sdxl' | 'controlnet' from the keys (and one shape) of a single file.

    Raises ValueError with a reason when the layout is not recognised."""
    keys = shapes.keys()
    if any(k.startswith(CONTROLNET_PREFIX) for k in keys) or "input_hint_block.0.weight" in shapes:
        return "controlnet"
    has_unet = any(k.startswith(UNET_PREFIX) for k in keys)
    if any(k.startswith(SDXL_TEXT2_PREFIX) for k in keys) or f"{UNET_PREFIX}label_emb.0.0.weight" in shapes:
        if not any(k.startswith(SDXL_TEXT_PREFIX) for k in keys) and any(
                k.startswith(SD2_TEXT_PREFIXES[1]) for k in keys):
            raise ValueError("this looks like an SDXL refiner (one OpenCLIP-bigG text encoder), "
                             "which ldm_engine does not support")
        return "sdxl"
    if any(k.startswith(SD2_TEXT_PREFIXES) for k in keys):
        return "sd2"
    if any(k.startswith(SD1_TEXT_PREFIX) for k in keys):
        return "sd1"
    if has_unet:  # no text encoder stored: the cross-attention width tells the family
        k = first_key_with_suffix(keys, UNET_PREFIX, "attn2.to_k.weight")
        if k is not None and len(shapes[k]) == 2:  # a [out, width] linear weight; anything else is corrupt
            width = shapes[k][-1]
            if width == 768:
                return "sd1"
            if width == 1024:
                return "sd2"
        raise ValueError("it has a U-Net (model.diffusion_model.*) but no text encoder, and its "
                         "cross-attention width does not identify the family")
    raise ValueError("no ldm/sgm U-Net (model.diffusion_model.*) or ControlNet (control_model.*) "
                     "keys found; is it a LoRA, an embedding, or a single component?")


# ----------------------------------------------------------------------------------------------
# LoRA adapters: kohya-ss / A1111 / ComfyUI (``lora_unet_*`` with dots as underscores, in the
# diffusers or the ldm/sgm module layout; ComfyUI's ``diffusion_model.<ldm path>``), diffusers / PEFT (``unet.<module>.lora_A.weight``) and
# diffusers' older savers (``.lora.down.weight``, ``.processor.to_q_lora.down.weight``).

LORA_PREFIXES = (  # longest first: file prefix -> component
    ("text_encoder_2.", "text_encoder_2"), ("text_encoder.", "text_encoder"), ("unet.", "unet"),
    ("lora_te2_", "text_encoder_2"), ("lora_te1_", "text_encoder"), ("lora_te_", "text_encoder"),
    ("lora_unet_", "unet"), ("diffusion_model.", "unet"),
)
LORA_PARTS = (  # key suffix -> part ("down": the rank x in factor, "up": out x rank, "alpha")
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_A.weight", "down"),
    (".lora_B.weight", "up"), (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"), (".alpha", "alpha"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),  # attention processors: attn1.processor.to_q_lora
)
_UNET_TOP_MODULES = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.")
_OLD_PROCESSOR = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}


def split_lora_key(key: str) -> tuple[str, str, str] | None:
    """``(component, module name as stored, part)`` of one LoRA tensor key, or None when the key
    is of no LoRA format read here (LoHa, LoKr, DoRA magnitudes, bias adapters...)."""
    suffix, part = next(((s, p) for s, p in LORA_PARTS if key.endswith(s)), ("", None))
    if part is None:
        return None
    name = key[:-len(suffix)]
    prefix, component = next(((p, c) for p, c in LORA_PREFIXES if name.startswith(p)), ("", None))
    if component is not None:
        name = name[len(prefix):]
    elif name.startswith(_UNET_TOP_MODULES):  # diffusers' first saver: U-Net keys without a prefix
        component = "unet"
    else:
        return None
    head, _, last = name.rpartition(".")
    if head.endswith(".processor") and last in _OLD_PROCESSOR:  # attention-processor LoRA
        name = f"{head[:-len('.processor')]}.{_OLD_PROCESSOR[last]}"
    return component, name, part


def invert_module_table(table: ModuleTable, module_paths) -> dict[str, str]:
    """ldm module path -> diffusers module path for each of ``module_paths`` (diffusers names)
    that ``table`` (e.g. ``unet_ldm_table(config)``) covers."""
    by_target = sorted(((new, old, renames) for old, (new, renames) in table.items()),
                       key=lambda e: -len(e[0]))
    out = {}
    for path in module_paths:
        for new, old, renames in by_target:
            if path != new and not path.startswith(new + "."):
                continue
            rest = path[len(new) + 1:]
            for ldm_name, diffusers_name in renames.items():
                if rest == diffusers_name or rest.startswith(diffusers_name + "."):
                    rest = ldm_name + rest[len(diffusers_name):]
                    break
            out[f"{old}.{rest}" if rest else old] = path
            break
    return out


def lora_module_aliases(module_paths, *, ldm_table: ModuleTable | None = None) -> dict[str, str]:
    """Every name a LoRA file may give one of ``module_paths`` -> that path: the path itself,
    kohya's underscored form of it, without a ``text_model.`` prefix (transformers >= 5.6 CLIP),
    and, with ``ldm_table``, the ldm/sgm path and its underscored form."""
    paths = list(module_paths)
    aliases: dict[str, str] = {}
    pairs = [(p, p) for p in paths] + list((ldm_table and invert_module_table(ldm_table, paths) or {}).items())
    for name, path in pairs:
        for alias in (name, name[len("text_model."):] if name.startswith("text_model.") else None):
            if alias:
                aliases.setdefault(alias, path)
                aliases.setdefault(alias.replace(".", "_"), path)
    return aliases
