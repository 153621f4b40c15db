"""The paper's evaluation protocol through jobs.evaluate --protocol (real Ray Train + Ray Data)."""
import pytest

from jobs import evaluate as evaluate_job
from pipeline import registry
from pipeline.sources.ingest import ingest
from tests.conftest import TINY

pytestmark = pytest.mark.integration


@pytest.fixture
def archive(synthetic_src, tmp_path, mlflow_root):
    arch = str(tmp_path / "archive")
    ingest(synthetic_src, arch, "proto", "2026-11-20")
    return arch


def _run(archive, *extra):
    return evaluate_job.main(["--deployment", "proto", "--archive", archive, "--protocol", "--backbone", TINY,
                              "--weights", "random", "--epochs", "1", "--steps-per-epoch", "2", *extra])


def test_multi_class_for_each_k(ray_local, archive, capsys):
    assert _run(archive, "--shots", "1,2", "--seeds", "0") == 0  # two fits, one per k (seeds loop alike)
    out = capsys.readouterr().out
    assert "1-shot (multi-class)" in out and "2-shot (multi-class)" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in
            ("tile", "washer", "fabric", "mean")}
    assert set(rows) == {"tile", "washer", "fabric", "mean"}
    assert rows["mean"].count("+-") == 6  # 2 k's x (I-AUROC, P-AUROC, PRO), each mean +- std over the seeds
    run = registry.connect().search_runs(experiment_names=["anople-proto"], filter_string="tags.job = 'evaluate-protocol'")
    assert len(run) == 1 and "metrics.k2.aupro.mean" in run.columns
    # nothing was registered: protocol models are experiments, not releases
    with pytest.raises(LookupError):
        registry.get_version("proto", alias="candidate")


def test_leave_one_product_out(ray_local, tmp_path, mlflow_root, capsys):
    """Two products: each is scored by a model whose prompts never saw it (its bank still holds its shots)."""
    from pipeline.sources.synthetic import make_mvtec_folder
    src = make_mvtec_folder(str(tmp_path / "src2"), ("pill", "grid"), n_train=2, n_test_good=2, n_test_defect=1,
                            size=64, seed=3)
    arch = str(tmp_path / "archive2")
    ingest(src, arch, "proto", "2026-11-20")
    assert _run(arch, "--shots", "1", "--seeds", "0", "--setting", "unseen") == 0
    out = capsys.readouterr().out
    assert "1-shot (unseen)" in out and "pill" in out and "grid" in out
