"""Training on several processes equals training on one with the same global batch (DDP over gloo, loopback).

The two-process side is one fresh subprocess, this file run as a script: Lightning's "ddp" strategy
starts the second process by running the same command again, so the test works inside pytest-xdist
workers and leaves no process group behind. The script runs `mmel train` (the CLI) to fine-tune
MIMIC end to end (a tiny random CLIP trains with it, so the gathered features carry gradients from
one process to the other), then trains M3EL and DIM on in-memory features. This process runs the
same on one process, and every run is compared: the loss at every step, the dev metrics and the
final weights, within float tolerance (the two add the same terms in another order). Dropout is 0
and hard negatives are whole pools, so that no random draw differs between the runs.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmel.core.config import ConfigError
from mmel.core.errors import UsageError
from mmel.core.features import FeatureBatch, PooledView
from mmel.models.dim import DIMConfig, DIMModel
from mmel.models.m3el import M3ELConfig, M3ELModel
from mmel.models.mimic import MIMICConfig, MIMICModel
from mmel.training.datamodule import GlobalBatchSampler
from mmel.training.recipe import load_recipe
from mmel.training.run import build_model, fit

RUN_LIMIT_S = 240          # a two-process run takes ~15 s on 2 cores; this only stops a hang
TWO_PROCESSES = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
LOSS_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
# Weights may differ by a twentieth of the largest step Adam takes (the learning rate): rounding
# differences in the gradients move its normalised steps a little (measured: under 2e-5 at lr 1e-3).
WEIGHT_TOLERANCE_IN_STEPS = 0.05


# --- a share of a batch is its part of the loss (one process, no DDP) -----------------------------


def _batch(count: int, generator: torch.Generator, *, views: bool = False) -> FeatureBatch:
    batch = FeatureBatch(text_global=torch.randn(count, 16, generator=generator),
                         text_tokens=torch.randn(count, 6, 16, generator=generator),
                         text_mask=torch.ones(count, 6, dtype=torch.bool),
                         image_global=torch.randn(count, 16, generator=generator),
                         image_patches=torch.randn(count, 5, 10, generator=generator),
                         has_image=torch.rand(count, generator=generator) > 0.3)
    if views:
        batch.views = {name: PooledView(torch.randn(count, 16, generator=generator),
                                        torch.rand(count, generator=generator) > 0.2)
                       for name in ("mention", "caption")}
    return batch


MODELS = {"mimic": lambda: MIMICModel(MIMICConfig(text_dim=16, image_global_dim=16, image_patch_dim=10, hidden_dim=8)),
          "m3el": lambda: M3ELModel(M3ELConfig(text_dim=16, image_global_dim=16, image_patch_dim=10, hidden_dim=8)),
          "dim": lambda: DIMModel(DIMConfig(text_dim=16, image_global_dim=16, image_patch_dim=10, num_heads=4,
                                            dropout=0.0))}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_shares_of_a_batch_add_up_to_its_loss_and_gradient(name: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]()
    generator = torch.Generator().manual_seed(1)
    mentions, entities = _batch(7, generator, views=True), _batch(7 + 7, generator)   # golds, then 1 negative each
    entity_ids = torch.tensor([3, 5, 3, 8, 9, 1, 5, 2, 4, 6, 7, 0, 3, 9])   # shared golds; negatives equal to golds
    labels = torch.arange(7)

    whole = model(mentions, entities, labels=labels, entity_ids=entity_ids)
    whole.loss.backward()
    whole_gradients = {key: value.grad.clone() for key, value in model.named_parameters() if value.grad is not None}
    model.zero_grad()
    shares = [model(mentions, entities, labels=labels, entity_ids=entity_ids, rows=rows)
              for rows in (slice(0, 3), slice(3, 4), slice(4, 7))]
    sum(share.loss for share in shares).backward()

    torch.testing.assert_close(torch.cat([share.scores for share in shares]), whole.scores)
    torch.testing.assert_close(sum(share.loss for share in shares), whole.loss)
    for unit, value in whole.unit_losses.items():
        torch.testing.assert_close(sum(share.unit_losses[unit] for share in shares), value)
    assert whole_gradients and {key: value.grad for key, value in model.named_parameters()
                                if value.grad is not None}.keys() == whole_gradients.keys()
    for key, gradient in whole_gradients.items():
        torch.testing.assert_close(dict(model.named_parameters())[key].grad, gradient, msg=key)


# --- every process draws its share of the same global batches -----------------------------------


def _joined_batches(num_rows: int, batch_size: int, processes: int, epoch: int) -> list[list[int]]:
    """The global batches as the processes' shares join them (padding shares left out)."""
    samplers = [GlobalBatchSampler(num_rows, batch_size, num_processes=processes, rank=rank, seed=7)
                for rank in range(processes)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    steps = [list(sampler) for sampler in samplers]
    assert len({len(shares) for shares in steps}) == 1 == len({len(sampler) for sampler in samplers})
    return [[int(row) for share in step if not share.padding for row in share.positions]
            for step in zip(*steps, strict=True)]


def test_every_process_draws_its_share_of_the_same_global_batches() -> None:
    one = _joined_batches(10, 4, 1, epoch=0)
    assert [len(batch) for batch in one] == [4, 4, 2]
    assert sorted(row for batch in one for row in batch) == list(range(10))
    assert _joined_batches(10, 4, 3, epoch=0) == one        # the last batch of 2 rows leaves process 3 a padding share
    assert _joined_batches(10, 4, 2, epoch=0) == one
    assert _joined_batches(10, 4, 2, epoch=1) == _joined_batches(10, 4, 1, epoch=1) != one
    padding = list(GlobalBatchSampler(10, 4, num_processes=3, rank=2, seed=7))[-1]
    assert padding.padding and padding.positions.tolist() == one[-1][:1]
    with pytest.raises(UsageError, match="at least one mention per process"):
        GlobalBatchSampler(10, 2, num_processes=3, rank=0)
    with pytest.raises(ConfigError, match=r"trainer\.strategy"):
        load_recipe("mimic-synthetic-cpu", ["trainer.strategy=ddp_spawn"])
    with pytest.raises(ConfigError, match=r"trainer\.devices"):
        load_recipe("mimic-synthetic-cpu", ["trainer.devices=0"])


# --- two processes train like one -----------------------------------------------------------------


def _run(command: list[str], cwd: Path) -> None:
    """Run a command that starts a process group (Lightning's DDP); kill the whole group if it hangs."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK")}
    environment.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    process = subprocess.Popen(command, cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=RUN_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{' '.join(command)} did not finish in {RUN_LIMIT_S} s:\n{output[-4000:]}")
    assert process.returncode == 0, output[-4000:]


def _metrics(run_dir: Path) -> tuple[list[float], dict[str, list[float]]]:
    """The loss of every step and every dev metric of every validation, from the run's CSV log."""
    with open(run_dir / "logs" / "session-1" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    steps = [float(row["train/loss_step"]) for row in rows if row.get("train/loss_step")]
    dev = {key: [float(row[key]) for row in rows if row.get(key)] for key in rows[0] if key.startswith("val/")}
    return steps, dev


def _assert_same_run(one: Path, two: Path, *, expected_steps: int, learning_rate: float) -> None:
    one_steps, one_dev = _metrics(one)
    two_steps, two_dev = _metrics(two)
    assert len(one_steps) == expected_steps
    np.testing.assert_allclose(two_steps, one_steps, **LOSS_TOLERANCE)
    assert one_dev["val/mrr"] and one_dev.keys() == two_dev.keys()
    for key, values in one_dev.items():
        np.testing.assert_allclose(two_dev[key], values, **LOSS_TOLERANCE, err_msg=key)
    one_state, two_state = (_without_key_biases(torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
                                                ["state_dict"]) for run in (one, two))
    assert one_state.keys() == two_state.keys()
    for key, value in one_state.items():
        torch.testing.assert_close(two_state[key], value, rtol=0, atol=WEIGHT_TOLERANCE_IN_STEPS * learning_rate,
                                   msg=key)


def _without_key_biases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights without the key biases of softmax attention (TGLU/IMN fc_key, MHA in_proj, CLIP k_proj).

    A key bias adds the same number to every logit of a softmax row, which the softmax ignores: its
    true gradient is 0, and Adam turns the rounding noise of that 0 into steps that differ with the
    order of any sum. Such a bias changes no score, so the comparison leaves it out.
    """
    kept = {key: value for key, value in state.items() if not key.endswith(("fc_key.bias", "k_proj.bias"))}
    for key in [key for key in kept if key.endswith("in_proj_bias")]:   # [query; key; value] biases
        query, _, value = kept[key].chunk(3)
        kept[key] = torch.cat([query, value])
    return kept


def _train_mimic_end_to_end(out_dir: Path, tiny_clip: Path, tiny_dataset: Path, overrides: list[str]) -> None:
    """`mmel train` (the CLI, in this process) fine-tunes MIMIC and the tiny CLIP: 12 training mentions in
    global batches of 5 (on two processes shares of 3 + 2, the last 1 + 1), 2 epochs of 3 steps."""
    from mmel.cli.main import app

    settings = [f"backbone.path={tiny_clip}", "data.batch_size=5", "data.num_workers=0", "trainer.max_epochs=2",
                "trainer.check_val_every_n_epoch=1", "trainer.progress=false", "trainer.accelerator=cpu",
                "trainer.num_threads=1", "optimizer.lr=1e-3", "trainer.log_every_n_steps=1", *overrides]
    app(["train", "--recipe", "mimic-paper", "--dataset", str(tiny_dataset), "--out", str(out_dir),
         *[part for setting in settings for part in ("--set", setting)]], standalone_mode=False)


def _train_on_features(out_dir: Path, overrides: list[str]) -> None:
    """M3EL and DIM on the in-memory synthetic features of test_training_run (93 usable training mentions)."""
    from test_training_run import WIDTHS, dim_datamodule, export_info, small_recipe, synthetic_datamodule

    # batches of 16 (on two processes shares of 8 + 8, the last 7 + 6), whole pools of 2 dense hard negatives
    m3el = small_recipe("model.type=m3el", "trainer.max_epochs=2", "optimizer.lr=3e-3", "data.hard_negatives=2",
                        "data.hard_negative_pool=2", *overrides)
    torch.manual_seed(0)
    fit(build_model(m3el.model, WIDTHS), synthetic_datamodule(m3el), m3el, out_dir / "m3el", export_info(m3el))
    # batches of 23: the last holds 1 mention, so on two processes the second gets a padding share; a single
    # dev mention, which every process ranks (M3EL's 20 are split between the processes)
    dim = load_recipe("dim-wikimel-cpu", ["data.batch_size=23", "data.hard_negatives=0", "trainer.progress=false",
                                          "trainer.max_epochs=2", "trainer.log_every_n_steps=1", "optimizer.lr=3e-3",
                                          "trainer.check_val_every_n_epoch=1", "validation.max_mentions=1",
                                          "model.options.dropout=0.0", *overrides])
    torch.manual_seed(0)
    fit(build_model(dim.model, WIDTHS), dim_datamodule(dim, []), dim, out_dir / "dim", export_info(dim))


def _train_all(out_dir: Path, tiny_clip: Path, tiny_dataset: Path, overrides: list[str]) -> None:
    _train_mimic_end_to_end(out_dir / "mimic", tiny_clip, tiny_dataset, overrides)
    _train_on_features(out_dir, overrides)


def test_two_processes_train_like_one(tiny_clip: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    """One two-process session (this file as a script) trains all three models; so does this process, on one."""
    _train_all(tmp_path / "one", tiny_clip, tiny_dataset, ["trainer.accelerator=cpu"])
    _run([sys.executable, __file__, str(tmp_path / "two"), str(tiny_clip), str(tiny_dataset)], tmp_path)
    _assert_same_run(tmp_path / "one" / "mimic", tmp_path / "two" / "mimic", expected_steps=6, learning_rate=1e-3)
    two_mimic = tmp_path / "two" / "mimic"
    assert (two_mimic / "summary.json").is_file() and (two_mimic / "best" / "model.safetensors").is_file()
    _assert_same_run(tmp_path / "one" / "m3el", tmp_path / "two" / "m3el", expected_steps=12, learning_rate=3e-3)
    _assert_same_run(tmp_path / "one" / "dim", tmp_path / "two" / "dim", expected_steps=10, learning_rate=3e-3)


if __name__ == "__main__":  # the two-process side of test_two_processes_train_like_one (Lightning starts the second)
    _train_all(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), TWO_PROCESSES)
