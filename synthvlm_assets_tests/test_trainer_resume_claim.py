"""Why training/loop.py is our own loop: transformers 5's Trainer loses LLaVA's weights on resume.

`Trainer._save` calls `save_pretrained`, which (save_original_format=True) reverts LLaVA's weight
conversion and writes the legacy names (`language_model.model.*`, `vision_tower.*`,
`multi_modal_projector.*`, `language_model.lm_head.*`). `Trainer._load_from_checkpoint` loads that file
with a plain `model.load_state_dict(..., strict=False)`, without the conversion, so no key matches
(`model.model.language_model.*`, `model.model.multi_modal_projector.*`, `lm_head.*`): the model keeps
its fresh weights (only a warning is logged) while the optimizer, scheduler and step are restored.
`from_pretrained(checkpoint)` does read the same file correctly.

If this test fails, transformers fixed it: Trainer could then replace our own loop."""

from __future__ import annotations

import pytest
import torch

from synthvlm_assets.storage import StorageRoot
from synthvlm_assets.training.data import PlainCollator, synthvlm_dataset
from synthvlm_assets.training.model import (
    ModelSettings,
    freeze_all_but_projector,
    load_model,
    tiny_cpu_threads,
    vision_token_count,
)
from synthvlm_assets_tests.training_toy import publish_toy_dataset

FIXED = (
    "transformers' Trainer now resumes LLaVA's weights: our own loop (synthvlm_assets/training/loop.py) could be "
    "replaced by it"
)


def _projector(model) -> dict:
    return {k: v.detach().clone() for k, v in model.model.multi_modal_projector.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trainer_resume_loses_llava_weights(tmp_path):
    from transformers import (
        LlavaForConditionalGeneration,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    storage = StorageRoot(str(tmp_path / "root"))
    publish_toy_dataset(storage, 16)
    records, _ = synthvlm_dataset(storage)

    class Toy(torch.utils.data.Dataset):
        def __len__(self):
            return len(records)

        def __getitem__(self, i):
            return records[i]

    seen: dict = {}

    class Watch(TrainerCallback):
        def __init__(self, tag: str, stop_at: int | None = None):
            self.tag, self.stop_at = tag, stop_at

        def on_train_begin(self, args, state, control, model=None, **kw):
            seen[f"{self.tag}@begin"] = _projector(model)  # after Trainer loaded the checkpoint

        def on_step_end(self, args, state, control, model=None, **kw):
            seen[f"{self.tag}@{state.global_step}"] = _projector(model)
            if state.global_step == self.stop_at:
                control.should_training_stop = True

    def train(tag: str, stop_at: int | None = None, resume: str | None = None) -> dict:
        settings = ModelSettings.tiny_preset()
        model, processor = load_model(settings)
        freeze_all_but_projector(model)
        args = TrainingArguments(
            output_dir=str(tmp_path / tag),
            per_device_train_batch_size=4,
            max_steps=4,
            save_steps=2,
            learning_rate=1e-3,
            seed=0,
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=Toy(),
            data_collator=PlainCollator(processor, vision_token_count(model)),
            callbacks=[Watch(tag, stop_at)],
        )
        with tiny_cpu_threads(settings):
            trainer.train(resume_from_checkpoint=resume)
        return _projector(model)

    uninterrupted = train("full")
    train("cut", stop_at=3)
    checkpoint = str(tmp_path / "cut" / "checkpoint-2")
    resumed = train("resumed", resume=checkpoint)

    step2 = seen["cut@2"]
    assert not _same(step2, seen["full@begin"]), "the projector did not train"
    # The checkpoint itself is complete: from_pretrained maps its legacy names back.
    assert _same(_projector(LlavaForConditionalGeneration.from_pretrained(checkpoint)), step2)

    loaded = seen["resumed@begin"]
    if _same(loaded, step2) or _same(resumed, uninterrupted):
        pytest.fail(FIXED)
    # The claim: resuming starts again from the fresh projector (step 2's weights are lost) ...
    assert _same(loaded, seen["full@begin"])
    # ... so the resumed run ends away from the uninterrupted one.
    assert max((resumed[k] - uninterrupted[k]).abs().max().item() for k in resumed) > 1e-4
