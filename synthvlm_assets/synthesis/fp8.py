"""The `fp8_linear` fast path: the SDXL UNet's transformer linear layers run as FP8 matmuls.

Weights are quantised once to float8_e4m3fn with one scale per output channel; activations are
quantised on the fly with one scale per row (per token), and `torch._scaled_mm` multiplies the two
and applies both scales (bf16 out). That is torchao's "float8 dynamic activation, float8 weight, per
row" recipe, written out here: torchao 0.18 refuses to run it anywhere but on an FP8 GPU, while
`torch._scaled_mm` has a CPU kernel, so this exact code path (not a stand-in) runs in the CPU tests.

Which layers: every nn.Linear inside the UNet's Transformer2DModel blocks (attention projections,
feed-forward, proj_in/proj_out: ~64% of the UNet's FLOPs at 1024²), except the cross-attention key
and value projections, which read the 77 text tokens (negligible compute; kept exact so the prompt
conditioning is not quantised). Convolutions, norms, attention itself and the time embeddings stay bf16.

What only an FP8 GPU shows: the speed (the CPU kernel is an emulation, slower than bf16), and that
inductor fuses the activation quantisation into neighbouring kernels under torch.compile.
"""

from __future__ import annotations

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
SETTING = "synthesis.fp8_linear"
# Cross-attention projections of the text tokens (attn2 of each transformer block), fused or not.
TEXT_SIDE = ("attn2.to_k", "attn2.to_v", "attn2.to_kv")


class FP8Linear(nn.Module):
    """y = x W^T + b with x quantised per row and W per output channel to float8_e4m3fn."""

    def __init__(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_fp8.shape
        self.register_buffer("weight_fp8", weight_fp8)  # (out, in), row-major: .t() is the column-major mat2
        self.register_buffer("weight_scale", weight_scale)  # (1, out) float32
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        w8 = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(w8.contiguous(), scale.t().contiguous(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        # One scale per row (token): an outlier token does not crush the resolution of the others.
        scale = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
        x8 = (x2.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        # use_fast_accum: Hopper's faster FP8 accumulation, as torchao's inference default (the CPU ignores it).
        y = torch._scaled_mm(
            x8,
            self.weight_fp8.t(),
            scale_a=scale,
            scale_b=self.weight_scale,
            bias=self.bias,
            out_dtype=x.dtype,
            use_fast_accum=True,
        )
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def fp8_layer_names(unet: nn.Module) -> list[str]:
    """The nn.Linear layers of `unet` that the fp8_linear path replaces (see the module docstring)."""
    names = []
    for name, module in unet.named_modules():
        if not isinstance(module, nn.Linear) or ".attentions." not in f".{name}":
            continue
        if name.endswith(TEXT_SIDE):
            continue
        parent = unet.get_submodule(name.rsplit(".", 1)[0])
        if name.rsplit(".", 1)[1] in ("to_q", "to_k", "to_v") and getattr(parent, "fused_projections", False):
            # Fused (fuse_qkv): the processor calls to_qkv / to_kv; the separate layers are no longer used.
            if not (parent.is_cross_attention and name.endswith("to_q")):
                continue
        if module.in_features % 16 or module.out_features % 16:
            continue  # _scaled_mm's CUDA kernels need both dimensions to be multiples of 16
        names.append(name)
    return names


def fp8_support_error(device: torch.device | str) -> str | None:
    """Why `device` cannot run the fp8_linear path (naming the setting), or None when it can."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return (
                f"{SETTING}=True needs a GPU with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper or "
                f"later); {torch.cuda.get_device_name(device)} is sm_{major}{minor}. Set {SETTING}=False."
            )
    elif device.type != "cpu":
        return f"{SETTING}=True runs on CUDA GPUs with compute capability >= 8.9 (or the CPU, for tests), not {device}"
    try:  # the kernel itself: a build without FP8 support fails here rather than mid-batch
        a = torch.ones(16, 16, device=device, dtype=FP8)
        scale_a, scale_b = torch.ones(16, 1, device=device), torch.ones(1, 16, device=device)
        torch._scaled_mm(a, a.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        return f"{SETTING}=True: torch {torch.__version__} cannot run an FP8 matmul on {device}: {exc}"
    return None


def apply_fp8_linear(unet: nn.Module) -> list[str]:
    """Replace the UNet's transformer linear layers by FP8Linear, in place; returns their names.

    Call after fuse_qkv_projections (the fused layers are the ones quantised) and after the UNet has
    its final device and dtype (a later `.to(dtype)` would cast the FP8 weights back)."""
    device = next(unet.parameters()).device
    error = fp8_support_error(device)
    if error:
        raise ValueError(error)
    dtype = next(unet.parameters()).dtype
    if dtype != torch.bfloat16:
        raise ValueError(f"{SETTING}=True needs synthesis.dtype='bf16' (the FP8 matmul writes bf16), not {dtype}")
    names = fp8_layer_names(unet)
    for name in names:
        parent_name, child = name.rsplit(".", 1)
        parent = unet.get_submodule(parent_name)
        setattr(parent, child, FP8Linear.from_linear(getattr(parent, child)))
    return names
