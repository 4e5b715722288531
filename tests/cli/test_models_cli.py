"""`mmel models list` and `mmel models import-official` end to end."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf
from typer.testing import CliRunner

from mmel.models import load_model
from mmel.models.m3el import M3ELConfig, M3ELModel

runner = CliRunner()
ENCODER_FCS = ("image_cls_fc.", "image_tokens_fc.")


def official_m3el_checkpoint(path) -> dict[str, torch.Tensor]:
    """A release-style M3EL .ckpt: both CMN units, fixed CSRA head weights, an unused logit_scale, OmegaConf hparams."""
    t2v = M3ELModel(M3ELConfig()).state_dict()
    bidirectional = M3ELModel(M3ELConfig(bidirectional=True)).state_dict()
    state = {("encoder." if key.startswith(ENCODER_FCS) else "matcher.") + key: tensor
             for key, tensor in {**t2v, **bidirectional}.items()}
    state["matcher.cmm.multi_head_module.weight"] = torch.ones(5, 1)
    state["matcher.cmmb.multi_head_module.weight"] = torch.ones(5, 1)
    state["matcher.weight_cl_loss.logit_scale"] = torch.tensor(2.6592)
    torch.save({"state_dict": state, "hyper_parameters": OmegaConf.create({"model": {"head_num": 5}})}, path)
    return state


def test_list_shows_registered_models_and_shipped_checkpoints(tmp_path) -> None:
    from mmel.cli.main import app

    M3ELModel(M3ELConfig(text_dim=24, image_global_dim=20, image_patch_dim=28)).save_pretrained(tmp_path / "m3el-tiny")
    result = runner.invoke(app, ["models", "list", "--checkpoints", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "m3el: M3ELModel" in result.output and "mimic: MIMICModel" in result.output
    assert "views: mention=mention_sentence entity=name_desc" in result.output
    assert "units: text, image, cross" in result.output and "units: tglu, vdlu, cmfu" in result.output
    assert "release_single_key_cmn_branch=False" in result.output
    assert f"checkpoints in {tmp_path}:" in result.output and "m3el-tiny: m3el" in result.output


def test_import_official_writes_a_loadable_checkpoint_and_reports_unused_tensors(tmp_path) -> None:
    from mmel.cli.main import app

    state = official_m3el_checkpoint(tmp_path / "wikidiverse.ckpt")
    result = runner.invoke(app, ["models", "import-official", "m3el", str(tmp_path / "wikidiverse.ckpt"),
                                 "--out", str(tmp_path / "imported"), "--set", "bidirectional=true"])
    assert result.exit_code == 0, result.output
    assert "matcher.weight_cl_loss.logit_scale" in result.output
    assert "matcher.cmm.text_fc.weight: the cmm unit, not built" in result.output
    assert "matcher.cmmb.multi_head_module.weight" in result.output
    assert "omegaconf.dictconfig.DictConfig" in result.output
    model = load_model(tmp_path / "imported")
    assert isinstance(model, M3ELModel) and model.config.bidirectional and model.cmm is None
    assert torch.equal(model.state_dict()["cmmb.gate_fc.weight"], state["matcher.cmmb.gate_fc.weight"])


def test_import_official_refuses_unknown_releases_and_config_keys(tmp_path) -> None:
    from mmel.cli.main import app

    official_m3el_checkpoint(tmp_path / "m3el.ckpt")
    result = runner.invoke(app, ["models", "import-official", "dim", str(tmp_path / "m3el.ckpt"),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "available: m3el, mimic" in result.output
    result = runner.invoke(app, ["models", "import-official", "m3el", str(tmp_path / "m3el.ckpt"),
                                 "--out", str(tmp_path / "out"), "--set", "dropout=0.1"])
    assert result.exit_code == 1 and "unknown M3ELConfig key(s) dropout" in result.output
    assert not (tmp_path / "out").exists()
