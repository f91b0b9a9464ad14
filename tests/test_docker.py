"""`mlflow models generate-dockerfile` (what `build-docker` builds) for a registered chimera model.

Docker itself cannot run here (no daemon), so no image is built. These tests run MLflow's real
CLI, which writes the Dockerfile and copies the model directory into the build context, and check
what the image would install: the Dockerfile's install step, and the copied model's
requirements.txt / python_env.yaml / conda.yaml — every ready variant's runtime pinned to the
version that built it, torch only for torch-based variants, and mlflow-chimera itself, which is not
on PyPI and comes from the wheel the model carries (``code_paths``). pip then resolves those
requirements offline (``--dry-run``, no index, stand-in wheels for the public packages) from where
each of the image's env managers runs it, to show that mlflow-chimera is found in the model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml

import mlflow_chimera

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["onnxruntime", "openvino", "eager"]
# The pip distribution each backend's variants need at run time.
RUNTIME_PACKAGE = {"onnxruntime": "onnxruntime", "openvino": "openvino", "eager": "torch",
                   "aotinductor": "torch", "torch_compile": "torch"}


def _pip_env() -> dict:
    """The environment for an offline pip: no configured indexes, find-links or constraints."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _pip(*args, cwd=None) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, env=_pip_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _build_chimera_wheel(folder: Path) -> Path:
    """mlflow-chimera's wheel, built from a copy of this checkout (nothing is written into it)."""
    src = folder / "src"
    shutil.copytree(ROOT / "mlflow_chimera", src / "mlflow_chimera",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(folder / "dist"), str(src))
    (wheel,) = (folder / "dist").glob("mlflow_chimera-*.whl")
    return wheel


def _stub_wheel(folder: Path, name: str, version: str) -> None:
    """An empty wheel standing in for a public package, so pip can resolve offline."""
    dist = f"{name.replace('-', '_')}-{version}"
    files = {f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                        "Tag: py3-none-any\n"}
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{p},,\n" for p in [*files, f"{dist}.dist-info/RECORD"])
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)


def _generate_dockerfile(model_uri: str, out: Path, tracking_uri: str, env_manager: str | None) -> Path:
    args = [sys.executable, "-m", "mlflow", "models", "generate-dockerfile", "-m", model_uri,
            "--output-directory", str(out)]
    if env_manager:
        args += ["--env-manager", env_manager]
    done = subprocess.run(args, env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / "Dockerfile").is_file() and (out / "model_dir" / "MLmodel").is_file()
    return out


@pytest.fixture(scope="module")
def docker_build(tracking_uri, tmp_path_factory):
    """A chimera model logged with mlflow-chimera's wheel in ``code_paths`` and registered, and
    the build context ``generate-dockerfile`` writes for it with the default env manager and
    with virtualenv."""
    import mlflow
    import mlflow.chimera  # noqa: F401

    import models

    folder = tmp_path_factory.mktemp("docker")
    wheel = _build_chimera_wheel(folder)
    name = "docker-mlp"
    mlflow.chimera.log_model(models.mlp(), name=name, input_example=models.examples()["mlp"],
                             registered_model_name=name, backends=BACKENDS, precisions=["fp32"],
                             code_paths=[str(wheel)])
    contexts = {em: _generate_dockerfile(f"models:/{name}/1", folder / f"context-{em or 'default'}",
                                         tracking_uri, em)
                for em in (None, "virtualenv")}
    return {"wheel": wheel, "contexts": contexts, "folder": folder}


def _requirements(model_dir: Path) -> list:
    return [line.strip() for line in (model_dir / "requirements.txt").read_text().splitlines() if line.strip()]


def _ready_variants(model_dir: Path) -> list:
    from mlflow_chimera.manifest import READY, Variant

    variants = [Variant.from_dict(json.loads(p.read_text())) for p in (model_dir / "variants").glob("*/variant.json")]
    return [v for v in variants if v.status == READY]


def _built_with(variant, package: str) -> str:
    """The version of ``package`` on the host that built ``variant``, without a local label."""
    return variant.provenance["build_host"]["packages"][package].split("+")[0]


@pytest.mark.slow
@pytest.mark.parametrize("env_manager", [None, "virtualenv"], ids=["default", "virtualenv"])
def test_dockerfile_installs_the_model_environment(docker_build, env_manager):
    context = docker_build["contexts"][env_manager]
    dockerfile = (context / "Dockerfile").read_text()
    model_dir = context / "model_dir"
    python = yaml.safe_load((model_dir / "python_env.yaml").read_text())["python"]
    # The default picks the local env manager on a python image of the model's Python version.
    expected_manager = env_manager or "local"
    if env_manager is None:
        assert f"FROM python:{python}-slim" in dockerfile
    assert "COPY model_dir /opt/ml/model" in dockerfile
    assert (f"_install_pyfunc_deps('/opt/ml/model', install_mlflow=False, env_manager='{expected_manager}')"
            in dockerfile)
    assert f"C._serve('{expected_manager}')" in dockerfile
    # The image serves the chimera loader, and the model carries the wheel it installs it from.
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "mlflow_chimera"
    assert pyfunc["env"]["virtualenv"] == "python_env.yaml"
    assert (model_dir / pyfunc["code"] / docker_build["wheel"].name).is_file()
    assert {v.backend for v in _ready_variants(model_dir)} == set(BACKENDS)


@pytest.mark.slow
def test_requirements_pin_what_built_the_ready_variants(docker_build):
    import mlflow

    model_dir = docker_build["contexts"][None] / "model_dir"
    requirements = _requirements(model_dir)
    expected = {f"mlflow=={mlflow.__version__}", f"mlflow-chimera=={mlflow_chimera.__version__}"}
    for variant in _ready_variants(model_dir):
        package = RUNTIME_PACKAGE[variant.backend]
        expected.add(f"{package}=={_built_with(variant, package)}")
    assert "torch==" + __import__("torch").__version__.split("+")[0] in expected
    assert {"onnxruntime", "openvino"} <= {r.split("==")[0] for r in expected}
    assert sorted(r for r in requirements if not r.startswith("-")) == sorted(expected)
    assert "--find-links code" in requirements
    # Each env manager reads the same list: python_env.yaml points at it, conda.yaml repeats it.
    python_env = yaml.safe_load((model_dir / "python_env.yaml").read_text())
    assert python_env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert python_env["dependencies"] == ["-r requirements.txt"]
    conda = yaml.safe_load((model_dir / "conda.yaml").read_text())
    assert [d for d in conda["dependencies"] if isinstance(d, dict)][0]["pip"] == requirements
    # The virtualenv build context carries the same model.
    assert _requirements(docker_build["contexts"]["virtualenv"] / "model_dir") == requirements


@pytest.mark.slow
@pytest.mark.parametrize("env_manager", ["local", "virtualenv"])
def test_the_image_resolves_mlflow_chimera_from_the_model(docker_build, env_manager, tmp_path):
    """pip, run as the image's build runs it, installs every pinned package at its version and
    mlflow-chimera from the wheel in the model's ``code/`` — no index has it."""
    context = docker_build["contexts"][None if env_manager == "local" else "virtualenv"]
    model_dir = context / "model_dir"
    requirements = _requirements(model_dir)
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    pins = dict(r.split("==") for r in requirements if "==" in r and not r.startswith("mlflow-chimera"))
    for name, version in pins.items():
        _stub_wheel(stubs, name, version)
    if env_manager == "local":
        # The Dockerfile's working directory; pip reads the model's requirements.txt by path.
        cwd, target = tmp_path / "opt-mlflow", str(model_dir / "requirements.txt")
        cwd.mkdir()
    else:
        # MLflow's virtualenv route: the model's files linked into a temporary folder, and a
        # requirements file there holding python_env.yaml's dependencies.
        cwd = tmp_path / "venv-install"
        cwd.mkdir()
        for item in model_dir.iterdir():
            (cwd / item.name).symlink_to(item)
        python_env = yaml.safe_load((model_dir / "python_env.yaml").read_text())
        target = "requirements.image.txt"
        (cwd / target).write_text("\n".join(python_env["dependencies"]))
    report = tmp_path / "report.json"
    _pip("install", "--dry-run", "--no-index", "--no-deps", "--ignore-installed", "-q",
         "--find-links", str(stubs), "--report", str(report), "-r", target, cwd=cwd)
    installed = {i["metadata"]["name"]: i for i in json.loads(report.read_text())["install"]}
    assert set(installed) == set(pins) | {"mlflow-chimera"}
    for name, version in pins.items():
        assert installed[name]["metadata"]["version"] == version
    chimera = installed["mlflow-chimera"]
    assert chimera["metadata"]["version"] == mlflow_chimera.__version__
    found = Path(unquote(urlparse(chimera["download_info"]["url"]).path))
    assert found.resolve() == (model_dir / "code" / docker_build["wheel"].name).resolve()


@pytest.mark.slow
def test_only_ready_variants_add_their_runtime(docker_build):
    """A variant that is not ready (failed its build or parity) adds nothing: an image without
    torch-based variants has no torch."""
    import dataclasses

    from mlflow_chimera.flavor import get_default_pip_requirements
    from mlflow_chimera.manifest import FAILED_PARITY

    variants = _ready_variants(docker_build["contexts"][None] / "model_dir")
    failed = {"eager", "openvino"}
    mixed = [dataclasses.replace(v, status=FAILED_PARITY) if v.backend in failed else v for v in variants]
    names = {r.split("==")[0] for r in get_default_pip_requirements(mixed)}
    assert names == {"mlflow-chimera", "onnxruntime"}
    assert get_default_pip_requirements(mixed, find_links="code")[0] == "--find-links code"


@pytest.mark.slow
def test_a_bundled_wheel_of_another_version_is_refused(tmp_path):
    """The wheel in the model must be the mlflow-chimera that builds it (refused before any build)."""
    from mlflow.exceptions import MlflowException

    import models

    with pytest.raises(MlflowException, match="mlflow_chimera-9.9.9-py3-none-any.whl"):
        mlflow_chimera.save_model(models.mlp(), tmp_path / "model", input_example=models.examples()["mlp"],
                                  code_paths=[str(tmp_path / "mlflow_chimera-9.9.9-py3-none-any.whl")])
