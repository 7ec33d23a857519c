"""``--init auto`` (the default): the shipped default pretrained model when there is one, otherwise
scratch with a note; explicit choices are kept as given."""
from hssl import finetune
from hssl.finetune import resolve_init


class Notes:
    def __init__(self):
        self.lines = []

    def log(self, text):
        self.lines.append(text)


def test_auto_uses_the_shipped_model_or_falls_back_to_scratch(tmp_path, monkeypatch):
    notes = Notes()
    (tmp_path / "Models" / "default").mkdir(parents=True)
    monkeypatch.setattr(finetune, "bundled_model_dir", lambda name="default": tmp_path / "Models" / name)
    assert resolve_init("auto", notes) == "scratch"
    assert notes.lines == ["note: no pretrained model is installed with this engine: training from scratch"]
    (tmp_path / "Models" / "default" / "model.json").write_text("{}")
    assert resolve_init("auto", notes) == "bundled" and len(notes.lines) == 1
    for explicit in ("scratch", "bundled", "bundled:dense", str(tmp_path)):
        assert resolve_init(explicit, notes) == explicit
    assert len(notes.lines) == 1
