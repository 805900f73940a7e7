"""The study's observers (TensorBoard, MLflow) behind one protocol, and the report made once, by the study."""

from __future__ import annotations

from classlab.observers import MlflowObserver, TensorBoardObserver
from tests.conftest import tiny_study, write_study


class Recorder:
    """An observer that writes down what it is told, in order."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def runs_start(self, ready) -> None:
        self.events.append(("runs_start", tuple(p.cfg.name for p in ready)))

    def epoch(self, k, row, state) -> None:
        self.events.append(("epoch", k, row["epoch"]))

    def runs_end(self) -> None:
        self.events.append(("runs_end",))

    def run_end(self, folder, failed) -> None:
        self.events.append(("run_end", folder.name, failed))

    def study_end(self, failed, waiting, report) -> None:
        self.events.append(("study_end", tuple(failed), tuple(waiting), report))

    def abort(self, error) -> None:
        self.events.append(("abort", type(error).__name__))


def test_observers_see_the_study_in_order_and_the_report_is_made_once(tmp_path, idx_folder, monkeypatch, run_cli):
    import classlab.report
    import classlab.study

    recorder = Recorder()
    monkeypatch.setattr(classlab.study, "study_observers", lambda *a, **k: [TensorBoardObserver(), recorder])
    made = []
    real = classlab.report.make_report
    monkeypatch.setattr(classlab.report, "make_report", lambda *a, **k: made.append(a) or real(*a, **k))
    study = tiny_study(tmp_path, idx_folder, train={"epochs": 2, "batch_size": 16, "tensorboard": True},
                       runs=[{"name": "a"}, {"name": "b", "train": {"lr": 0.01}}])
    code, out, _ = run_cli("run", str(write_study(tmp_path / "s.yaml", study)))
    assert code == 0
    folder = tmp_path / "runs" / "toy"
    assert len(made) == 1  # the study made it; the CLI only says where
    assert f"report:{folder / 'report.html'}" in "".join(out.split())
    names = [e[0] for e in recorder.events]
    assert names == ["runs_start", "epoch", "epoch", "runs_end", "run_end"] * 2 + ["study_end"]
    assert recorder.events[-1] == ("study_end", (), (), (folder / "report.html", folder / "report.md"))
    assert [e[1] for e in recorder.events if e[0] == "run_end"] == ["a", "b"]
    assert any((folder / "a" / "tensorboard").iterdir())  # TensorBoard is an observer like any other


def test_mlflow_observer_logs_the_studys_report_only_when_no_run_is_left():
    calls = []

    class Tracker:
        def _guard(self, fn):
            return fn()

        def log_report(self, paths=None, reference=None):
            calls.append(("log_report", paths))

        def close(self, failed, waiting, report=True, reference=None):
            calls.append(("close", tuple(waiting), report))

    observer = MlflowObserver(Tracker())
    observer.study_end([], ["b"], ("r.html", "r.md"))
    observer.study_end([], [], ("r.html", "r.md"))
    assert calls == [("close", ("b",), False), ("log_report", ("r.html", "r.md")), ("close", (), False)]
