"""Distributed data parallel through torchrun: 2 processes on the CPU with gloo; the replicas must
end bit-identical although each process trained on different crops."""
import json
import os
import subprocess
import sys

import pytest
import torch.distributed as td

from hssl.model_store import load_model
from hssl.pretrain.trainer import load_checkpoint, parameter_digest
from pretrain_helpers import REPO, SCRIPT, tiny_config, tiny_tree, write_config


@pytest.mark.skipif(not td.is_available() or not td.is_gloo_available(), reason="torch without gloo")
def test_two_processes_stay_identical(tmp_path):
    sources = tiny_tree(tmp_path / "data")
    tree = tiny_config(tmp_path / "out", sources, max_steps=4, checkpoint_every=2)
    tree["export"] = {"hssl_model": True, "monai_bundle": False}
    config = write_config(tmp_path / "c.json", tree)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(SCRIPT), "--config", str(config)], capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=240, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = [json.loads((tmp_path / "out" / "replicas" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [4, 4]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    # The processes saw different crops (so agreement is DDP's doing, not identical inputs).
    assert ranks[0]["first_local_loss"] != ranks[1]["first_local_loss"]
    # The checkpoint and the exported network are those replicas.
    state = load_checkpoint(tmp_path / "out" / "checkpoints" / "step-0000004.pt")
    import torch

    from hssl.plan import Plan
    from hssl.pretrain.heads import PretrainNet

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 4
    model = load_model(tmp_path / "out" / "model")
    net_state = {k[len("net."):]: v for k, v in state["model"].items() if k.startswith("net.")}
    assert all(torch.equal(net_state[k], v) for k, v in model.net.state_dict().items())
    plan = Plan.from_json(model.meta["plan"])
    rebuilt = PretrainNet(plan, 2, 2, ["bottleneck", "decoder"], 8)
    rebuilt.load_state_dict(state["model"])
    assert parameter_digest(rebuilt) == ranks[0]["digest"]
