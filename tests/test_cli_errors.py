"""Every mistake a user can type on the ``slapo-train`` command line is one ``error:`` line naming
the input and what would be valid, exit code 2, no traceback, and nothing written (no run
directory). The battery runs in-process through the CLI's ``main``; all but the last few cases
fail in the up-front checks, before any data is read."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from slapo_lightning.cli.train import EXIT_USER_ERROR, main

NEEDS_FILES = "{tmp}"


def run_main(monkeypatch, capsys, tmp_path, args: list[str]) -> str:
    """``main(args)`` in ``tmp_path``; asserts exit 2, one line, no traceback, nothing new on disk."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "cache" not in p.parts)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == EXIT_USER_ERROR, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), err
    assert "Traceback" not in err
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "cache" not in p.parts)
    assert after == before, f"the failed run left {set(after) - set(before)}"
    return lines[-1]


@pytest.fixture
def files(tmp_path):
    """Inputs that are files on disk: a text file, a non-Lightning torch file, a directory, YAML specs."""
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "broken.yaml").write_text("passes:\n  p: {select: [unclosed\n")
    (tmp_path / "bad_op.yaml").write_text("passes:\n  p:\n    select: transformer.h.*.mlp\n    steps:\n"
                                         "      - replace: {op: fused_mlpp}\n")
    return tmp_path


UP_FRONT = [
    # -- groups, keys, types, syntax ------------------------------------------------------------------
    (["recipe=t5"], "unknown recipe 't5'; valid: bert, gpt2"),
    (["trainer=tpu"], "unknown trainer 'tpu' (did you mean 'tp', 'gpu', 'cpu'?); valid: auto, cpu, ddp, fsdp, gpu, tp"),
    (["logger=[csv,wandb]"], "unknown logger 'wandb'"),
    (["model.layers=4"], "unknown key 'model.layers': model has no 'layers' (valid: _target_, size,"),
    (["schedule=none", "schedule.passes.fused_qkv.enabled=false"], "schedule.passes has no 'fused_qkv' (valid: (none))"),
    (["trainer.max_steps=many"], "bad value trainer.max_steps='many': Trainer takes an integer"),
    (["data.val_fraction=[1]"], "bad value data.val_fraction=[1]: TextDataModule takes a number"),
    (["trainer.precision=bf16mixed"], "bad value trainer.precision='bf16mixed': Trainer takes one of"),
    (["model.size=7"], "bad value model.size=7: CausalLMModule takes a string"),
    (["trainer.max_steps=[1"], "cannot parse override 'trainer.max_steps=[1'"),
    (["seed=abc"], "seed='abc' is not valid: an integer"),
    # -- model ----------------------------------------------------------------------------------------
    (["model.size=huge"], "unknown model.size preset 'huge'; valid: tiny, base, medium"),
    (["model.lr=-1"], "model.lr=-1 is not valid: a number in (0, 10]"),
    (["model.lr=0"], "model.lr=0 is not valid: a number in (0, 10]"),
    (["model.betas=[0.9]"], "model.betas=[0.9] is not valid: two numbers in [0, 1)"),
    (["model.warmup_steps=-5"], "model.warmup_steps=-5 is not valid: an integer >= 0"),
    (["model.attn_implementation=flash"], "unknown model.attn_implementation 'flash'"),
    (["model.pretrained_path=/no/such/model"], "model.pretrained_path: '/no/such/model' is not a directory with a config.json"),
    (["+model.config.n_head=5"], "hidden size 128 is not a multiple of the 5 attention heads"),
    # -- data -----------------------------------------------------------------------------------------
    (["data.paths=[/no/such/corpus]"], "data.paths: '/no/such/corpus' does not exist"),
    (["data.batch_size=0"], "data.batch_size=0 is not valid: an integer >= 1"),
    (["data.seq_len=4096"], "data.seq_len=4096 exceeds the model's 128 positions"),
    (["data.val_fraction=1.5"], "data.val_fraction=1.5 is not valid: a number in (0, 1)"),
    (["recipe=bert", "data.mlm_probability=0"], "data.mlm_probability=0 is not valid: a number in (0, 1)"),
    (["data.tokenizer_kind=sentencepiece"], "unknown data.tokenizer_kind 'sentencepiece'"),
    (["data.objective=seq2seq"], "unknown data.objective 'seq2seq'"),
    (["recipe=bert", "data.tokenizer_kind=byte_bpe"], "data.objective=mlm needs [CLS], [SEP] and [MASK] tokens"),
    (["data.num_workers=-1"], "data.num_workers=-1 is not valid: an integer >= 0"),
    (["data.tokenizer_path=/no/such/tokenizer"], "data.tokenizer_path: '/no/such/tokenizer' is not a directory"),
    # -- trainer --------------------------------------------------------------------------------------
    (["trainer.max_steps=0"], "trainer.max_steps=0 is not valid: an integer >= 1 or -1"),
    (["trainer.max_steps=-1"], "trainer.max_steps=-1 with trainer.max_epochs=null never ends"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0 is not valid"),
    (["trainer.devices=0"], "trainer.devices=0 is not valid: a count >= 1, -1 (all), 'auto'"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0 is not valid: an integer >= 1"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1 is not valid"),
    (["trainer.val_check_interval=0"], "trainer.val_check_interval=0 is not valid"),
    (["+trainer.strategy=fsdp_typo"], "trainer: "),
    (["trainer.accelerator=tpu"], "trainer: "),
    # -- schedule -------------------------------------------------------------------------------------
    (["schedule=/no/such/schedule.yaml"], "schedule spec file '/no/such/schedule.yaml' does not exist"),
    (["schedule={tmp}/broken.yaml"], "malformed YAML"),
    (["schedule={tmp}/bad_op.yaml"], "unknown op 'fused_mlpp' (did you mean 'fused_mlp'"),
    (["schedule.passes.flash_attention.backend=cudnn"], "unknown attention backend 'cudnn'"),
    (["trainer=tp", "trainer.devices=3", "trainer.strategy.tensor_parallel_size=2"],
     "trainer.strategy: data_parallel_size=1 x tensor_parallel_size=2 = 2 ranks, but trainer.devices=3 x "
     "trainer.num_nodes=1 start 3"),
    (["trainer=fsdp", "trainer.strategy.data_parallel_size=zero"],
     "bad value trainer.strategy.data_parallel_size='zero': ModelParallelStrategy takes one of 'auto' or an integer"),
    # -- callbacks ------------------------------------------------------------------------------------
    (["callbacks.schedule.verify=sometimes"], "callbacks.schedule: ScheduleCallback: verify='sometimes' is not supported"),
    (["callbacks.schedule.schedule=/no/such/spec.yaml"], "schedule spec file '/no/such/spec.yaml' does not exist"),
    (["callbacks.schedule.schedule=gtp2"], "unknown schedule 'gtp2' (did you mean 'gpt2'?); valid: "),
    (["callbacks.checkpoint.save_top_k=-2"], "callbacks.checkpoint: "),
    (["callbacks.throughput.peak_flops=-5"], "callbacks.throughput.peak_flops=-5: give the peak FLOP/s of one device"),
    # -- checkpoints and outputs ----------------------------------------------------------------------
    (["ckpt_path=/no/such.ckpt"], "ckpt_path: '/no/such.ckpt' is not a checkpoint file (no such file)"),
    (["ckpt_path={tmp}/notes.txt"], "is not a Lightning checkpoint torch can load safely"),
    (["ckpt_path={tmp}/plain.pt"], "is not a Lightning training checkpoint (it has no state_dict, loops, global_step)"),
    (["ckpt_path={tmp}/a_dir"], "is a directory, not a distributed checkpoint (it has no .metadata)"),
    (["export_dir={tmp}/notes.txt"], "export_dir="),
]
if not torch.cuda.is_available():
    UP_FRONT.append((["trainer=gpu"], "trainer.accelerator='gpu': this machine has no CUDA GPU"))


@pytest.mark.parametrize("args, message", UP_FRONT, ids=[" ".join(a) for a, _ in UP_FRONT])
def test_a_mistake_is_one_line_before_anything_runs(monkeypatch, capsys, files, args, message):
    args = [a.replace("{tmp}", str(files)) for a in args]
    line = run_main(monkeypatch, capsys, files, args)
    assert message.replace("{tmp}", str(files)) in line, line


def test_the_battery_covers_every_part_of_the_config():
    assert len({tuple(a) for a, _ in UP_FRONT}) >= 25
    touched = {a.split("=")[0].lstrip("+").split(".")[0] for args, _ in UP_FRONT for a in args}
    assert {"model", "data", "trainer", "schedule", "callbacks", "ckpt_path", "recipe"} <= touched


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def small(cache) -> list[str]:
    return ["schedule=none", f"data.cache_dir={cache}", "data.max_chars=20000", "data.vocab_size=500",
            "trainer.enable_progress_bar=false"]


def test_a_checkpoint_of_another_model_is_one_line_and_leaves_no_run_dir(monkeypatch, capsys, tmp_path, cache):
    """It passes the up-front checks (a real Lightning checkpoint file) and is refused before fit."""
    torch.save({"state_dict": {"model.other.weight": torch.zeros(2)}, "loops": {}, "global_step": 3,
                "pytorch-lightning_version": "2.6.0"}, tmp_path / "other.ckpt")
    line = run_main(monkeypatch, capsys, tmp_path, [*small(cache), f"ckpt_path={tmp_path}/other.ckpt"])
    assert f"ckpt_path: '{tmp_path}/other.ckpt' was saved from another model" in line
    assert "e.g. model.transformer.wte.weight" in line and "e.g. model.other.weight" in line


def test_too_little_text_is_one_line_and_leaves_no_run_dir(monkeypatch, capsys, tmp_path, cache):
    (tmp_path / "texts").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "texts" / name).write_text("tiny text " * 3)
    line = run_main(monkeypatch, capsys, tmp_path, [*small(cache), f"data.paths=[{tmp_path}/texts]",
                                                     f"data.tokenizer_path={_tokenizer(cache)}"])
    assert "fewer than one block of data.seq_len=128" in line


def _tokenizer(cache) -> str:
    from slapo_lightning.data import TextDataModule

    dm = TextDataModule(max_chars=20000, vocab_size=500, cache_dir=str(cache))
    dm.tokenizer
    return str(dm.tokenizer_dir)


def test_full_error_shows_the_traceback(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    from slapo_lightning.errors import RecipeError

    with pytest.raises(RecipeError, match="model.lr=-1"):
        main(["model.lr=-1"])
