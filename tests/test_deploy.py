"""Offline checks of the deployment files: cluster.yaml, Dockerfile, .dockerignore, .rayignore.

No cloud calls, no Docker engine, no Ray cluster: everything here is parsing plus the Ray
launcher's own offline config steps, so it runs in about a second.

What cannot be checked offline (and is not): the AWS bootstrap (`bootstrap_aws`: IAM role,
key pair, subnets, security groups, AMI lookup) calls the AWS API, and an image build needs a
Docker engine and the network.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import ray

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
DOCKERFILE = ROOT / "Dockerfile"
WORKING_DIR_CAP = 512 * 1024 * 1024  # Ray's working_dir upload limit

# file_mounts local paths allowed outside the repo: user-side files the RUNBOOK creates.
USER_SIDE_MOUNTS = {"~/.ray/auth_token"}


# ---------------------------------------------------------------------------------------- helpers
def _cluster() -> dict:
    with CLUSTER_YAML.open() as f:
        return yaml.safe_load(f)


def _pyproject() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def _requirements() -> dict[str, Requirement]:
    reqs = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            r = Requirement(line)
            reqs[canonicalize_name(r.name)] = r
    return reqs


def _pin(req: Requirement) -> str:
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"{req} is not an exact pin"
    return specs[0].version


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    out, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, "Dockerfile ends in a line continuation"
    return out


def _start_commands(cfg: dict, key: str) -> str:
    return " ; ".join(cfg[key])


def _flag_value(cmd: str, flag: str) -> list[str]:
    """Every value of `--flag=v` or `--flag v` in a shell command line."""
    toks = shlex.split(cmd.replace(";", " ; "))
    vals = []
    for i, t in enumerate(toks):
        if t.startswith(flag + "="):
            vals.append(t.split("=", 1)[1])
        elif t == flag and i + 1 < len(toks):
            vals.append(toks[i + 1])
    return vals


# ----------------------------------------------------------------------------------- cluster.yaml
def test_cluster_yaml_matches_the_schema_in_the_ray_wheel():
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(_cluster(), schema)


def test_cluster_yaml_passes_the_launchers_prepare_and_validate():
    # prepare_config merges ray/autoscaler/aws/defaults.yaml (a local file), merges setup
    # commands, checks the docker section and fills per-type worker bounds: no AWS call.
    # validate_config re-runs the schema and the cross-field checks (head type listed, sum of
    # min_workers <= max_workers). The AWS bootstrap step that follows in `ray up`
    # (bootstrap_aws) needs credentials and the network, so it is not run here.
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _cluster()
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    # The shallow merge over defaults.yaml must not smuggle in the defaults' setup commands
    # (they pip-install a Ray nightly) or a world-open dashboard.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert prepared[key] == raw[key], key
        assert not any("pip install" in c for c in prepared[key]), f"{key} installs packages"
    assert prepared["head_start_ray_commands"] == raw["head_start_ray_commands"]
    assert prepared["worker_start_ray_commands"] == raw["worker_start_ray_commands"]


def test_node_types_head_cpu_only_gpu_workers_autoscale_from_zero():
    cfg = _cluster()
    assert cfg["cluster_name"] == "wsseg"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head must not advertise GPUs"
    assert head.get("max_workers", 0) == 0
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    gpu_types = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no worker type advertises a GPU"
    for name, t in gpu_types.items():
        assert 0 == t.get("min_workers", 0) <= t["max_workers"], name
        assert t["max_workers"] >= 1, name
        assert t["max_workers"] <= cfg["max_workers"], name
        assert t["resources"].get("CPU", 0) >= 1, name
    assert cfg["idle_timeout_minutes"] > 0


def test_dashboard_bound_to_localhost_and_head_autoscales():
    cfg = _cluster()
    head = _start_commands(cfg, "head_start_ray_commands")
    worker = _start_commands(cfg, "worker_start_ray_commands")
    assert "--head" in head
    assert _flag_value(head, "--dashboard-host") == ["127.0.0.1"]
    assert "0.0.0.0" not in head + worker
    assert _flag_value(head, "--autoscaling-config"), "head would not autoscale"
    port = _flag_value(head, "--port")
    assert port and _flag_value(worker, "--address") == [f"$RAY_HEAD_IP:{port[0]}"]
    # token auth everywhere (docs/RUNBOOK.md): the token file is mounted on every node
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in worker
    assert "/home/ray/.ray/auth_token" in cfg["file_mounts"]


def test_no_security_group_rule_opens_ray_ports_to_the_world():
    cfg = _cluster()
    rules = cfg["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
        cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + [
            r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        open_world = {"0.0.0.0/0", "::/0"} & set(cidrs)
        for port in (8265, 6379, 10001):
            covers = lo == -1 or lo <= port <= hi
            assert not (open_world and covers), f"port {port} open to {open_world}: {rule}"


def test_file_mounts_local_paths_exist():
    cfg = _cluster()
    for remote, local in cfg.get("file_mounts", {}).items():
        if local in USER_SIDE_MOUNTS:
            continue  # created on the user's machine by a RUNBOOK step, never part of the repo
        path = (ROOT / local).resolve()
        assert path.exists(), f"file_mounts {remote}: {local} does not exist in the repo"
        assert ROOT in path.parents or path == ROOT, f"{local} is outside the repo"
        for bad in (".venv", "runs", ".git"):
            assert bad not in path.relative_to(ROOT).parts, f"{local} mounts {bad}"


def test_docker_image_is_the_project_image_at_the_project_version():
    cfg = _cluster()
    docker = cfg["docker"]
    assert docker.get("container_name")
    image = docker["image"]
    # "<registry>/wsseg:<version>" once pushed; "wsseg:<version>" as committed
    name, _, tag = image.rpartition(":")
    assert "/" not in tag, f"image {image!r} has no tag"
    assert name.rsplit("/", 1)[-1] == "wsseg", image
    assert tag == _pyproject()["project"]["version"], (
        f"cluster.yaml image tag {tag} != pyproject version")
    # if a fixed --shm-size is ever set, it must be a real size
    for opt in docker.get("run_options", []):
        if "--shm-size" in opt:
            assert re.search(r"--shm-size[= ]\d+[gGmM]", opt), opt


# ------------------------------------------------------------------------------------- Dockerfile
def test_dockerfile_base_image_ray_matches_the_pin():
    instrs = _dockerfile_instructions()
    froms = [a for i, a in instrs if i == "FROM"]
    assert len(froms) == 1, "expected a single-stage build"
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu", froms[0])
    assert m, f"unexpected base image {froms[0]!r} (want rayproject/ray:<ver>-py311-gpu)"
    ray_pin = _pin(_requirements()["ray"])
    assert m.group(1) == ray_pin, f"base image ray {m.group(1)} != requirements.txt ray {ray_pin}"
    assert m.group(1) == ray.__version__, "the venv's ray differs from the image's"
    requires = _pyproject()["project"]["requires-python"]
    assert requires == f">={m.group(2)}.{m.group(3)}", (requires, froms[0])


def test_dockerfile_installs_the_pins_and_the_project():
    instrs = _dockerfile_instructions()
    runs = [a for i, a in instrs if i == "RUN"]
    pip_runs = [r for r in runs if re.search(r"\bpip3? install\b", r)]
    assert any("-r requirements.txt" in r for r in pip_runs), "does not install requirements.txt"
    assert any("--no-deps ." in r for r in pip_runs), "does not install the project (--no-deps .)"
    # any package pinned inline must agree with requirements.txt
    reqs = _requirements()
    for r in pip_runs:
        for name, ver in re.findall(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([0-9][^\s\"']*)", r):
            key = canonicalize_name(name)
            assert key in reqs, f"Dockerfile installs {name} which is not in requirements.txt"
            assert ver == _pin(reqs[key]), f"Dockerfile pins {name}=={ver}, requirements {reqs[key]}"
    # the requirements install comes before the project install
    i_req = next(i for i, r in enumerate(runs) if "-r requirements.txt" in r)
    i_prj = next(i for i, r in enumerate(runs) if "--no-deps ." in r)
    assert i_req < i_prj


def test_dockerfile_final_user_is_not_root():
    users = [a.split(":")[0] for i, a in _dockerfile_instructions() if i == "USER"]
    assert users, "no USER: the container would run as root"
    assert users[-1] not in {"root", "0"}


def test_dockerfile_copy_sources_exist_and_are_not_dockerignored():
    from ray._private.thirdparty.pathspec import PathSpec  # the matcher Ray itself uses

    ignore_lines = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
                    if l.strip() and not l.strip().startswith("#")]
    spec = PathSpec.from_lines("gitwildmatch", ignore_lines)
    copies = [a for i, a in _dockerfile_instructions() if i in {"COPY", "ADD"}]
    assert copies
    for args in copies:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        assert len(parts) >= 2, args
        for src in parts[:-1]:
            path = ROOT / src
            assert path.exists(), f"COPY source {src} does not exist"
            rel = src.rstrip("/")
            assert not spec.match_file(rel) and not spec.match_file(rel + "/x"), (
                f"COPY source {src} is excluded by .dockerignore")
    for heavy in (".venv", "runs", ".git"):
        assert spec.match_file(heavy + "/x"), f".dockerignore does not exclude {heavy}"


def test_requirements_and_pyproject_agree_pin_for_pin():
    project = _pyproject()["project"]
    declared = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        declared += extra
    from_pyproject = {}
    for line in declared:
        r = Requirement(line)
        from_pyproject[canonicalize_name(r.name)] = r
    from_reqs = _requirements()
    assert set(from_pyproject) == set(from_reqs), (
        set(from_pyproject) ^ set(from_reqs))
    for name, r in from_reqs.items():
        p = from_pyproject[name]
        assert _pin(r) == _pin(p), f"{name}: requirements {r} vs pyproject {p}"
        assert r.extras == p.extras, f"{name}: extras differ ({r.extras} vs {p.extras})"


# ------------------------------------------------------------------------------ working_dir upload
def test_working_dir_upload_excludes_venv_and_runs_and_fits_the_cap():
    # Ray's own traversal (same excludes as `ray job submit --working-dir .`: .gitignore and
    # .rayignore, applied per folder).
    from ray._private.runtime_env.packaging import _dir_travel

    files: list[Path] = []
    _dir_travel(ROOT, [], lambda p: files.append(p) if p.is_file() else None,
                include_gitignore=True)
    rels = [p.relative_to(ROOT) for p in files]
    for heavy in (".venv", "runs", ".git", "data"):
        assert not any(r.parts and r.parts[0] == heavy for r in rels), f"{heavy} would be uploaded"
    assert any(r.parts[0] == "jobs" for r in rels) and any(r.parts[0] == "wsseg_core" for r in rels)
    total = sum(p.stat().st_size for p in files)
    assert total < WORKING_DIR_CAP, f"working_dir upload would be {total} bytes"


def test_rayignore_lists_the_venv_explicitly():
    # independent of .gitignore: a checkout without .gitignore must still not upload the venv
    from ray._private.thirdparty.pathspec import PathSpec  # the matcher Ray itself uses

    spec = PathSpec.from_lines("gitwildmatch", (ROOT / ".rayignore").read_text().splitlines())
    for heavy in (".venv/bin/python", "runs/demo/metrics/x.parquet", "data/autoPET/a/SUV.nii.gz"):
        assert spec.match_file(heavy), heavy
    for code in ("jobs/pipeline.py", "wsseg_core/data.py"):
        assert not spec.match_file(code), code
