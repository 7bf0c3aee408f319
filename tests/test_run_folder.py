"""RunFolder: the files of a run, written atomically, read onto the CPU; plans at a step from the trajectory;
--force clears a run's files only."""
import torch
import torchvision

from fxcompress import Plan
from fxcompress.finetune.run_folder import RunFolder, plan_until
from fxcompress.plan import Decision
from fxcompress.trainable import apply_plan, plan_of

STEPS = [{"step": 0, "decisions": []},
         {"step": 1, "decisions": [{"action": "linearize", "target": "a:relu", "params": {}}]},
         {"step": 2, "decisions": [{"action": "remove_block", "target": "b:add", "params": {}}]}]


def test_plans_at_each_step_come_from_the_trajectory(tmp_path):
    folder = RunFolder(tmp_path)
    folder.save_trajectory({"steps": STEPS, "kept": 2})
    assert folder.plan_at(0) == Plan() and plan_until(STEPS, 1) == Plan((Decision("linearize", "a:relu"),))
    assert [d.target for d in folder.plan_at(2).decisions] == ["a:relu", "b:add"]
    assert folder.trajectory()["kept"] == 2 and not (tmp_path / "trajectory.json.tmp").exists()


def test_models_round_trip_and_clear_leaves_other_files(tmp_path):
    folder = RunFolder(tmp_path)
    example = (torch.randn(1, 3, 32, 32),)
    planned = apply_plan(torchvision.models.resnet18().eval(), Plan.linearize(["layer1.0.relu:relu"]), example)
    folder.save_model(planned)
    folder.save_model(planned, step=3)
    folder.save_checkpoint({"plan": plan_of(planned).to_dict()})
    (tmp_path / "notes.txt").write_text("mine")
    assert plan_of(folder.kept_model()) == plan_of(folder.step_model(3)) == plan_of(planned)
    assert folder.holds_run() and folder.files() == ["checkpoint.pt", "kept.pt", "notes.txt", "steps"]
    folder.clear()
    assert folder.files() == ["notes.txt"] and folder.kept_model() is None and folder.checkpoint() is None
