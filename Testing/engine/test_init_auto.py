"""``--init auto`` (the default) starts where ``model_format.DEFAULT_START`` says: from scratch, or
from the shipped default pretrained model when there is one (scratch with a note otherwise);
explicit choices are kept as given."""
from hssl import finetune
from hssl.finetune import resolve_init
from hssl.model_format import DEFAULT_START


class Notes:
    def __init__(self):
        self.lines = []

    def log(self, text):
        self.lines.append(text)


def test_auto_is_the_default_start_chosen_on_the_development_set(tmp_path, monkeypatch):
    (tmp_path / "Models" / "default").mkdir(parents=True)
    (tmp_path / "Models" / "default" / "model.json").write_text("{}")
    monkeypatch.setattr(finetune, "bundled_model_dir", lambda name="default": tmp_path / "Models" / name)
    notes = Notes()
    assert DEFAULT_START in ("scratch", "bundled")
    assert resolve_init("auto", notes) == DEFAULT_START
    assert resolve_init("auto", notes, default_start="scratch") == "scratch"  # even with a model installed
    assert notes.lines == []


def test_a_pretrained_default_start_uses_the_shipped_model_or_falls_back_to_scratch(tmp_path, monkeypatch):
    notes = Notes()
    (tmp_path / "Models" / "default").mkdir(parents=True)
    monkeypatch.setattr(finetune, "bundled_model_dir", lambda name="default": tmp_path / "Models" / name)
    assert resolve_init("auto", notes, default_start="bundled") == "scratch"
    assert notes.lines == ["note: no pretrained model is installed with this engine: training from scratch"]
    (tmp_path / "Models" / "default" / "model.json").write_text("{}")
    assert resolve_init("auto", notes, default_start="bundled") == "bundled" and len(notes.lines) == 1
    for explicit in ("scratch", "bundled", "bundled:dense", str(tmp_path)):
        assert resolve_init(explicit, notes, default_start="bundled") == explicit
        assert resolve_init(explicit, notes, default_start="scratch") == explicit
    assert len(notes.lines) == 1
