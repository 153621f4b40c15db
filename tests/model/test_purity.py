"""Layering: pipeline/model/ is pure torch (no ray, mlflow, faiss or storage imports), and the core library
modules work without Ray or MLflow (only training, batch, cluster, registry and runs may use them)."""
import ast
import pathlib
import subprocess
import sys

FORBIDDEN = ("ray", "mlflow", "faiss", "fsspec", "s3fs", "boto3", "botocore", "pyarrow", "pipeline.storage")
MODEL_DIR = pathlib.Path(__file__).resolve().parents[2] / "pipeline" / "model"


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import inside pipeline.model is fine; above it is not
                assert node.level == 1, f"{path}: relative import leaves pipeline.model"
                continue
            yield node.module


def test_no_forbidden_import_statements():
    files = list(MODEL_DIR.rglob("*.py"))
    assert files
    for f in files:
        for mod in _imports(f):
            root_ok = not any(mod == m or mod.startswith(m + ".") for m in FORBIDDEN)
            assert root_ok, f"{f.name} imports {mod}"
            assert not mod.startswith("pipeline.") or mod.startswith("pipeline.model"), f"{f.name} imports {mod}"


def test_importing_the_model_loads_none_of_them():
    code = ("import sys, pkgutil, importlib, pipeline.model as m\n"
            "[importlib.import_module('pipeline.model.' + i.name) for i in pkgutil.iter_modules(m.__path__)]\n"
            f"print(sorted(x for x in {FORBIDDEN!r} if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


CORE = ("storage", "sources.archive", "sources.ingest", "sources.images", "fitting.bank", "fitting.shots",
        "nightly.scorer", "fitting.prompts", "artifact", "evaluation.metrics", "fitting.weights", "fitting.config",
        "sources.synthetic", "errors", "nightly.nights", "fitting.validation", "heap", "sources.device_decode")


def test_core_modules_import_neither_ray_nor_mlflow():
    """Imported together in a fresh interpreter, the core modules load no ray and no mlflow (directly or
    through one another)."""
    code = ("import sys, importlib\n"
            f"[importlib.import_module('pipeline.' + m) for m in {CORE!r}]\n"
            "print(sorted({n.split('.')[0] for n in sys.modules} & {'ray', 'mlflow'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    pipeline_dir = MODEL_DIR.parent
    assert all((pipeline_dir / f"{m.replace('.', '/')}.py").exists() for m in CORE)  # the list names real modules


def test_the_decode_and_table_tasks_load_no_torch_mlflow_or_faiss():
    """Ray Data's CPU workers import the tasks' modules (pipeline.sources.decoding, pipeline.nightly.score_table) and stay light."""
    code = ("import sys, pipeline.sources.decoding, pipeline.nightly.score_table\n"
            "print(sorted(x for x in ('torch', 'open_clip', 'faiss', 'mlflow', 'pipeline.nightly.stages') if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_fit_entry_ray_trains_controller_unpickles_loads_no_torch_mlflow_or_faiss():
    """Ray Train's controller unpickles the train function and its config (pipeline.fitting.job): light, so the
    controller starts the workers without first importing the training stack."""
    code = ("import sys, pickle, pipeline.fitting.job as f\n"
            "job = f.FitJob(f.TrainConfig('d', '/tmp/a'), ('p',))\n"
            "pickle.loads(pickle.dumps((f.fit_worker, {'job': job})))\n"
            "print(sorted(x for x in ('torch', 'open_clip', 'faiss', 'mlflow', 'pipeline.fitting.ray_train', 'pipeline.fitting.worker') if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_scoring_actors_module_loads_no_mlflow():
    """A scoring actor imports pipeline.nightly.stages: MLflow (~2 s of CPU per actor start) only when its model is
    behind a tracking server (pipeline.registry, imported then)."""
    code = ("import sys, pipeline.nightly.stages\n"
            "print(sorted(x for x in ('mlflow', 'pipeline.registry') if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
