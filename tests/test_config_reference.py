"""The generated configuration reference: every key of every config model, with type, default and meaning;
`classlab config --reference` and docs/config.md agree."""

from pydantic import BaseModel

from classlab import config as C
from classlab.config_reference import all_keys, render_markdown, render_text, sections
from tests.conftest import REPO

DOC = REPO / "docs" / "config.md"
REGENERATE = "docs/config.md is out of date: classlab config --reference --markdown > docs/config.md"


def _reachable() -> set[type[BaseModel]]:
    """Every config model a study file can reach (data / model / train through RunConfig's sections)."""
    found: set[type[BaseModel]] = set()
    run_fields = C.RunConfig.model_fields
    todo = [C.StudyConfig, *(m for name in C.RUN_SECTIONS for m in C._models_in(run_fields[name].annotation))]
    while todo:
        cls = todo.pop()
        if cls in found:
            continue
        found.add(cls)
        for info in cls.model_fields.values():
            todo += C._models_in(info.annotation)
    return found


def test_docs_file_is_the_generated_markdown():
    assert DOC.read_text(encoding="utf-8") == render_markdown(), REGENERATE


def test_cli_prints_the_same_reference(run_cli):
    code, text, _ = run_cli("config", "--reference")
    assert code == 0 and text == render_text()
    code, markdown, _ = run_cli("config", "--reference", "--markdown")
    assert code == 0 and markdown == DOC.read_text(encoding="utf-8")
    for key in all_keys():  # each key, its type and default, in both
        assert f"  {key.path}: {key.type} = {key.default}\n" in text
        assert f"| `{key.path}` |" in markdown


def test_every_field_of_every_model_appears_with_a_meaning():
    secs = sections()
    documented = {s.model for s in secs}
    models = {m for m in _reachable() if m.model_fields}
    assert models <= documented, f"not in the reference: {sorted(m.__name__ for m in models - documented)}"
    for s in secs:
        names = [k.path.rsplit(".", 1)[-1] for k in s.keys]
        assert names == list(s.model.model_fields), s.title
        missing = [k.path for k in s.keys if not k.meaning]
        assert not missing, f"add description= to these fields in config.py: {missing}"
    # every config class in config.py is reachable from a study file (RunConfig is the resolved run, not a key)
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    defined = {c for c in subclasses(C.Strict) if c.__module__ == C.__name__ and c.model_fields}
    assert defined - models <= {C.RunConfig}, sorted(c.__name__ for c in defined - models)


def test_readme_flags_and_presets_are_there():
    keys = {k.path: k for k in all_keys()}
    for path in ("train.amp", "train.label_smoothing", "train.nesterov", "train.early_stopping.monitor",
                 "train.early_stopping.min_delta", "train.tensorboard", "data.augment.randaugment.num_ops",
                 "data.augment.trivialaugment.num_magnitude_bins", "data.augment.random_resized_crop.scale",
                 "data.augment.random_erasing.value", "data.augment.mixup", "data.augment.cutmix",
                 "model.layers[].conv.out", "select.rule", "seeds", "grid"):
        assert path in keys, path
    assert (keys["train.epochs"].type, keys["train.epochs"].default) == ("int > 0", "10")
    assert keys["train.early_stopping.monitor"].type.startswith("loss | accuracy")  # the metric registry's names
    assert keys["train.early_stopping.patience"].default == "3"
    assert keys["data.augment.hflip"].type == "float in [0, 1]"
    assert keys["data.normalize.mean"].default == "required"
    assert keys["data.augment.random_resized_crop.ratio"].default == "[0.75, 1.33333]"
    assert keys["train.scheduler"].type == "section train.scheduler"
    variants = [s.title for s in sections() if s.variant is not None]
    assert "model (name: cnn)" in variants and "model (name: resnet18)" in variants


def test_cli_section_filter_and_errors(run_cli):
    code, out, _ = run_cli("config", "--reference", "train.early_stopping")
    assert code == 0 and out.startswith("train.early_stopping\n") and "train.epochs" not in out
    assert "train.early_stopping.min_delta: float ≥ 0 = 0.0" in out
    code, out, _ = run_cli("config", "--reference", "data.augment")
    assert "data.augment.randaugment.magnitude" in out and "data.root" not in out
    code, _, err = run_cli("config", "--reference", "trian")
    assert code == 2 and "no section 'trian'" in err
    code, _, err = run_cli("config")
    assert code == 2 and "--reference" in err
