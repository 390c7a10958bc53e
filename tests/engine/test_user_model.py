"""A user's own model (no ``config``, one PerturbSite, no BatchNorm) trains with APART through the
public ``apart_fast.train``; its model.pt holds the weights and ``load_model`` says how to use them."""

from __future__ import annotations

import pytest
import torch
from dist_helpers import TinyRes

import apart_fast
from apart_fast.config import ApartConfig, Config
from apart_fast.engine import checkpoint


def test_user_residual_model_trains_with_apart(tmp_path):
    torch.manual_seed(0)
    model = TinyRes()
    before = model.conv1.weight.detach().clone()
    out = tmp_path / "run"
    cfg = Config(method="apart", dataset="synthetic", batch_size=128, epochs=1, eval_n=32, eval_steps=1,
                 final_eval_steps=0, out=str(out), apart=ApartConfig(lr=1e-3, a_init=0.01, a_in=0.01, a_layer=0.01))
    res = apart_fast.train(cfg, model=model)
    assert res["model"] is model and not torch.equal(model.conv1.weight, before)
    assert res["history"][-1]["a_layer0"] != 0.01  # the site's step size was trained
    payload = checkpoint.load(out / "model.pt")
    assert payload["model_config"] is None
    with pytest.raises(checkpoint.CheckpointError, match="user-defined model.*load_state_dict"):
        apart_fast.load_model(str(out / "model.pt"))
    fresh = TinyRes()
    fresh.load_state_dict(payload["model"])
    assert torch.equal(fresh.conv1.weight, model.conv1.weight)
    with pytest.raises(checkpoint.CheckpointError, match="user-defined model"):  # resume needs the model again
        apart_fast.engine.loop.train(Config(out=str(out), epochs=2), resume=True, progress=False)


def test_train_overrides_leave_the_config_alone_and_refuse_unknown_names(tmp_path):
    from apart_fast.config import ConfigError

    cfg = Config(method="clean", dataset="synthetic", batch_size=64, epochs=1, eval_n=0, final_eval_steps=0)
    with pytest.raises(ConfigError, match="unknown setting 'epoch'"):
        apart_fast.train(cfg, epoch=3)  # a typo is an error, not a silently ignored attribute
    res = apart_fast.train(cfg, out=str(tmp_path / "run"))
    assert cfg.out is None and (tmp_path / "run" / "model.pt").is_file() and res["epochs"] == 1
