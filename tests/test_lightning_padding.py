"""Fine-tuning as users do it: their own LightningModule, a padding collator (some batches padded,
some not, some without a mask at all) and a shipped schedule applied by the callback. Every
per-step loss equals the unscheduled model's."""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import transformers as tf
from torch.utils.data import DataLoader

import slapo_lightning as slapo
from slapo_lightning.core import TracedModule

VOCAB, PAD = 120, 0
SCHEDULES = "slapo_lightning/configs/schedule"


def sequences() -> list[list[int]]:
    """Lengths chosen so that batches of 2 alternate: padded, equal lengths, padded, ..."""
    generator = torch.Generator().manual_seed(0)
    lengths = [9, 5, 7, 7, 12, 3, 6, 6, 10, 8, 4, 4]
    return [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def pad_collate(items: list[tuple[list[int], int]]) -> dict:
    """Pads to the longest sequence; an unpadded batch of even length comes without a mask at all."""
    longest = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), longest), PAD)
    mask = torch.zeros((len(items), longest), dtype=torch.long)
    for row, (seq, _) in enumerate(items):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    labels = torch.tensor([label for _, label in items])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if bool(mask.all()) and longest % 2 == 0:
        del batch["attention_mask"]
    return batch


class Classifier(pl.LightningModule):
    """A user's module: a BERT sequence classifier, plain SGD."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = tf.BertForSequenceClassification(tf.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3, attn_implementation="sdpa"))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class CausalLM(Classifier):
    """A user's causal LM fine-tuning: GPT-2, loss on the real tokens only."""

    def __init__(self):
        pl.LightningModule.__init__(self)
        torch.manual_seed(0)
        self.model = tf.GPT2LMHeadModel(tf.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, attn_implementation="sdpa"))
        self.losses = []

    def training_step(self, batch, batch_idx):
        labels = batch["input_ids"].masked_fill(batch.get("attention_mask", torch.ones_like(batch["input_ids"])) == 0,
                                                -100)
        loss = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels).loss
        self.losses.append(loss.item())
        return loss


def train(module: pl.LightningModule, callbacks: list, root, precision: str = "32-true") -> list[float]:
    data = [(seq, i % 3) for i, seq in enumerate(sequences())]
    loader = DataLoader(data, batch_size=2, shuffle=False, collate_fn=pad_collate)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         default_root_dir=root, precision=precision)
    trainer.fit(module, loader)
    return module.losses


def test_the_collator_makes_every_kind_of_batch():
    data = [(seq, 0) for seq in sequences()]
    batches = [pad_collate(data[i:i + 2]) for i in range(0, len(data), 2)]
    kinds = {("attention_mask" in b, bool((b.get("attention_mask", torch.ones(1)) == 0).any())) for b in batches}
    assert kinds == {(True, True), (True, False), (False, False)}


@pytest.mark.parametrize("module_cls,schedule", [(Classifier, "bert.yaml"), (CausalLM, "gpt2.yaml")],
                         ids=["bert-classifier", "gpt2-causal-lm"])
def test_shipped_schedule_trains_exactly_like_the_original_with_a_padding_collator(module_cls, schedule, tmp_path):
    expected = train(module_cls(), [], tmp_path)
    scheduled = module_cls()
    callback = slapo.ScheduleCallback(f"{SCHEDULES}/{schedule}", print_report=False)
    got = train(scheduled, [callback], tmp_path)
    assert len(got) == len(expected) == 12
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    traced = [m for m in scheduled.model.modules() if isinstance(m, TracedModule)]
    assert traced and all(len(m.specialisations) >= 1 for m in traced)
    assert all(spec.origin == "setup" for m in traced for spec in m.specialisations), \
        "the variants a padding collator produces were built at setup, none at run time"


def test_a_kind_of_call_first_seen_in_training_is_specialised_and_reported(tmp_path):
    """Setup traces in float32; bf16 autocast during training is another kind of call (the dtypes
    the code sees change): new specialisations at run time, the same losses as the original under
    autocast, and the report written at the end of training lists them."""
    import json

    expected = train(Classifier(), [], tmp_path, precision="bf16-mixed")
    scheduled = Classifier()
    report = tmp_path / "report.json"
    callback = slapo.ScheduleCallback(f"{SCHEDULES}/bert.yaml", print_report=False, report_path=str(report))
    got = train(scheduled, [callback], tmp_path, precision="bf16-mixed")
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=2e-2, atol=2e-2)
    variants = json.loads(report.read_text())["specialisations"]["bert.encoder.layer.0.attention.self"]
    origins = [v["origin"] for v in variants]
    assert "setup" in origins and "run time" in origins
    assert any("autocast=cpu:bfloat16" in v["label"] for v in variants)
