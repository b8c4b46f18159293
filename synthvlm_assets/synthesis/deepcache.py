"""The `deepcache_interval` fast path: DeepCache (Ma et al., 2023) for UNet2DConditionModel.

Between adjacent denoising steps a UNet's deep features change little. On a key step (every
`interval`-th step, starting with the first) the UNet runs whole and the output of its second-to-last
up block is kept. On the other steps only the shallow path runs: conv_in, the first down block (whose
outputs are the skip connections of the last up block), the last up block fed with the kept feature,
and conv_out; the deeper down blocks, the mid block and the other up blocks are not computed. For SDXL
base at 1024² the shallow path is ~7% of the UNet's FLOPs.

Why our own: diffusers 0.42's step caches do not apply to the SDXL UNet. FirstBlockCache, MagCache,
SeaCache and LayerSkip look for a top-level list of transformer blocks (`blocks`,
`transformer_blocks`, ...), which a UNet (down_blocks / mid_block / up_blocks) has not: FirstBlockCache
raises, MagCache hooks nothing, SeaCache refuses. TaylorSeer's default patterns match no UNet module;
FasterCache is written for video transformers' inputs. Pyramid Attention Broadcast does hook the UNet's
self-attention modules, but it reuses attention outputs only (not the convolutions nor the feed-forward
layers) and needs a current-timestep callback that the SDXL pipeline does not provide.
The hooks here do use diffusers' hook registry (diffusers.hooks.ModelHook), as its caches do.

Key and skip steps are chosen from outside the UNet (the pipeline's step-end callback), so under
torch.compile the UNet has exactly two graphs, one per kind of step.
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook

HOOK = "synthvlm_deepcache"


class _State:
    def __init__(self) -> None:
        self.skip = False  # the next UNet call is a skip step
        self.feature: torch.Tensor | None = None  # output of the second-to-last up block, last key step


class _Skip(ModelHook):
    """A deep block: computed on key steps; on skip steps it returns placeholders nobody reads."""

    def __init__(self, state: _State, kind: str, placeholders: int = 0) -> None:
        super().__init__()
        self.state, self.kind, self.placeholders = state, kind, placeholders

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        if not self.state.skip:
            return self.fn_ref.original_forward(*args, **kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.kind == "down":
            # (hidden, res_samples): the res_samples are sliced off by the up blocks that are skipped too.
            return hidden, (hidden,) * self.placeholders
        return hidden


class _Keep(ModelHook):
    """The second-to-last up block: keeps its output on key steps, returns it on skip steps."""

    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        if not self.state.skip:
            out = self.fn_ref.original_forward(*args, **kwargs)
            self.state.feature = out
            return out
        if self.state.feature is None:
            raise RuntimeError("DeepCache: a skip step before any key step (DeepCache.reset() not called)")
        return self.state.feature


class DeepCache:
    """DeepCache installed on a UNet2DConditionModel. Per pipeline call: `reset()` first, and pass
    `step_end` as the pipeline's `callback_on_step_end` (it decides the kind of the next step)."""

    def __init__(self, unet: torch.nn.Module, interval: int) -> None:
        if interval < 1:
            raise ValueError(f"synthesis.deepcache_interval must be >= 1, got {interval}")
        if len(unet.down_blocks) < 2 or len(unet.up_blocks) < 2:
            raise ValueError("DeepCache needs a UNet with at least two down and two up blocks")
        self.unet, self.interval, self.state = unet, interval, _State()
        self.key_steps = self.skipped_steps = 0
        deep: list[tuple[torch.nn.Module, ModelHook]] = []
        for block in unet.down_blocks[1:]:
            outputs = len(block.resnets) + (len(block.downsamplers) if block.downsamplers is not None else 0)
            deep.append((block, _Skip(self.state, "down", outputs)))
        if unet.mid_block is not None:
            deep.append((unet.mid_block, _Skip(self.state, "mid")))
        deep += [(block, _Skip(self.state, "up")) for block in unet.up_blocks[:-2]]
        deep.append((unet.up_blocks[-2], _Keep(self.state)))
        self._hooked = [block for block, _ in deep]
        for block, hook in deep:
            HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, HOOK)

    def reset(self) -> None:
        """Before a pipeline call: its first step is a key step, and no feature of an earlier call is kept."""
        self.state.skip, self.state.feature = False, None

    def is_key_step(self, step: int) -> bool:
        return step % self.interval == 0

    def step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """The pipeline's callback_on_step_end: step `step` is done; sets up step + 1."""
        if self.is_key_step(step):
            self.key_steps += 1
        else:
            self.skipped_steps += 1
        self.state.skip = not self.is_key_step(step + 1)
        return {}  # the pipeline keeps its own latents

    def remove(self) -> None:
        """Take the hooks off: the UNet computes every step whole again."""
        for block in self._hooked:
            block._diffusers_hook.remove_hook(HOOK, recurse=False)
        self.reset()
