"""Security (issue 11): no code path unpickles a file, and whatever listens binds to 127.0.0.1.

1. A static audit (ast) of every module in bdcore/ and sweep/ for calls that unpickle a file or run
   code from one, with a self-test showing it flags each pattern; allowed exceptions are listed with
   their reason.
2. A booby-trapped pickle (unpickling it creates a marker file) planted where each loader looks: the
   loader refuses it with a clear error or ignores it as documented, the marker never appears, and no
   standard unpickler resolves a single global meanwhile (seen through the `pickle.find_class` audit event).
3. Listeners: `bdsweep ui` binds MLflow's UI to 127.0.0.1 unless told otherwise, and Ray starts without
   its dashboard; the audit lists every place that starts a server, so a new one needs a review here.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import json
import os
import pickle
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
AUDITED_PACKAGES = ("bdcore", "sweep")


# ------------------------------------------------------------------------------------ static audit

# Names that unpickle or execute what a file (or string) holds: any use is a finding, whether called,
# aliased or subclassed; a name also covers everything under it (`shelve` covers `shelve.open`).
FORBIDDEN: dict[str, str] = {
    "pickle.load": "unpickles a file", "pickle.loads": "unpickles bytes", "pickle.Unpickler": "an unpickler",
    "pickle._Unpickler": "an unpickler", "pickle._load": "unpickles", "pickle._loads": "unpickles",
    "_pickle.load": "unpickles", "_pickle.loads": "unpickles", "_pickle.Unpickler": "an unpickler",
    "cloudpickle": "unpickles", "dill": "unpickles", "joblib.load": "unpickles", "shelve": "a pickle database",
    "marshal.load": "loads code objects", "marshal.loads": "loads code objects",
    "pandas.read_pickle": "unpickles a file", "torch.jit.load": "runs TorchScript code from a file",
    "torch.package": "unpickles a package",
    "yaml.unsafe_load": "constructs arbitrary objects", "yaml.unsafe_load_all": "constructs arbitrary objects",
    "yaml.full_load": "constructs Python objects", "yaml.full_load_all": "constructs Python objects",
    "yaml.Loader": "unsafe YAML loader", "yaml.UnsafeLoader": "unsafe YAML loader",
    "yaml.FullLoader": "unsafe YAML loader", "yaml.CLoader": "unsafe YAML loader",
    "yaml.CUnsafeLoader": "unsafe YAML loader", "yaml.CFullLoader": "unsafe YAML loader",
    "builtins.eval": "evaluates code", "builtins.exec": "executes code",
    # Tune's experiment state is pickled; a resume reads the engine's own markers instead.
    "ray.cloudpickle": "unpickles", "ray.tune.Tuner.restore": "unpickles Tune's experiment state",
    "ray.tune.ExperimentAnalysis": "reads Tune's experiment state", "ray.tune.analysis": "reads Tune's state",
}
# Fine only with the right arguments (checked at each call; a bare reference cannot be checked).
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
NUMPY_LOADS = {"numpy.load"}
YAML_LOADS = {"yaml.load", "yaml.load_all"}
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader", "yaml.CBaseLoader"}
CHECKED = TORCH_LOADS | NUMPY_LOADS | YAML_LOADS
BUILTIN_CODE_RUNNERS = {"eval", "exec"}

# (file, name) -> why it is allowed. Each entry must still occur (a stale one fails the audit).
ALLOWED: dict[tuple[str, str], str] = {
    ("bdcore/data/safe_pickle.py", "pickle.Unpickler"):
        "SafeUnpickler subclasses it and resolves only numpy-array globals (CIFAR's python-version batches are "
        "pickles); anything else raises DatasetError before it runs (test_cifar_batches_... below)",
}

# Where a server may start: (file, what) -> why it is fine. The audit lists every such site.
LISTENERS_REVIEWED: dict[tuple[str, str], str] = {
    ("sweep/runner.py", "ray.init"): "local Ray without its dashboard (test_ray_starts_without_its_dashboard)",
    ("sweep/cli.py", "mlflow ui"): "bdsweep ui: 127.0.0.1 unless --host says otherwise (test_bdsweep_ui_*)",
}
LISTENER_NAMES = {
    "socket.socket", "socket.create_server", "http.server", "socketserver", "wsgiref.simple_server",
    "xmlrpc.server", "asyncio.start_server", "uvicorn", "flask", "werkzeug.serving", "aiohttp.web",
    "tornado", "mlflow.server", "ray.serve", "ray.dashboard", "ray.init",
}
ALL_INTERFACES = {"0.0.0.0", "::", ""}  # host values that mean "every interface" (checked as host= arguments)


def _covered(name: str, patterns) -> str | None:
    """The pattern `name` falls under (equal, or a member of it), if any."""
    for pattern in patterns:
        if name == pattern or name.startswith(pattern + "."):
            return pattern
    return None


class _Module:
    """One parsed module: import aliases resolved to full names, and its classes' bases."""

    def __init__(self, source: str, module_name: str = ""):
        self.tree = ast.parse(source)
        self.aliases: dict[str, str] = {}
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        self.aliases[alias.asname] = alias.name
                    else:
                        self.aliases[alias.name.split(".")[0]] = alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = module_name.split(".")[: -node.level]  # `from . import x` in a.b.c -> a.b.x
                    base = ".".join([*parent, base] if base else parent)
                for alias in node.names:
                    self.aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
        self.class_bases = {node.name: [self.qualified(b) for b in node.bases]
                            for node in ast.walk(self.tree) if isinstance(node, ast.ClassDef)}

    def qualified(self, node: ast.AST) -> str | None:
        """`np.load` -> "numpy.load", `loads` (from pickle) -> "pickle.loads", `eval` -> "builtins.eval"."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        if node.id in self.aliases:
            base = self.aliases[node.id]
        elif node.id in BUILTIN_CODE_RUNNERS:
            base = f"builtins.{node.id}"
        else:
            base = node.id
        return ".".join([base, *reversed(parts)])

    def names_used(self):
        """(node, full name) of every name, attribute chain and import in the module."""
        for node in ast.walk(self.tree):
            if isinstance(node, (ast.Name, ast.Attribute)):
                name = self.qualified(node)
                if name:
                    yield node, name
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    yield node, alias.name
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    yield node, self.aliases[alias.asname or alias.name]

    def is_safe_yaml_loader(self, name: str | None, seen: frozenset = frozenset()) -> bool:
        if name in SAFE_YAML_LOADERS:
            return True
        if name in self.class_bases and name not in seen:  # a subclass defined in this module
            return any(self.is_safe_yaml_loader(b, seen | {name}) for b in self.class_bases[name])
        return False


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_constant(node: ast.AST | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _check_call(module: _Module, call: ast.Call, name: str) -> str | None:
    """Why this call of a CHECKED function can unpickle, or None when its arguments make it safe."""
    if name in TORCH_LOADS and not _is_constant(_keyword(call, "weights_only"), True):
        return f"{name} without weights_only=True unpickles arbitrary objects"
    if name in NUMPY_LOADS:
        allow = _keyword(call, "allow_pickle")
        if allow is not None and not _is_constant(allow, False):
            return f"{name} with allow_pickle unpickles object arrays"
    if name in YAML_LOADS:
        loader = _keyword(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
        if loader is None or not module.is_safe_yaml_loader(module.qualified(loader)):
            return f"{name} without a SafeLoader constructs arbitrary objects"
    return None


@functools.lru_cache(maxsize=None)
def _parsed(source: str, module_name: str) -> _Module:
    return _Module(source, module_name)  # both audits read every file: parse it once


def audit_unpickling(source: str, module_name: str = "") -> list[tuple[int, str, str]]:
    """(line, name, why) for every use in `source` of something that can unpickle or run code."""
    module = _parsed(source, module_name)
    found: dict[tuple[int, str], str] = {}
    checked_calls: set[int] = set()
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Call):
            name = module.qualified(node.func)
            if name in CHECKED:
                checked_calls.add(id(node.func))
                problem = _check_call(module, node, name)
                if problem:
                    found[(node.lineno, name)] = problem
    for node, name in module.names_used():
        pattern = _covered(name, FORBIDDEN)
        if pattern:
            found.setdefault((node.lineno, pattern), FORBIDDEN[pattern])
        elif name in CHECKED and isinstance(node, (ast.Name, ast.Attribute)) and id(node) not in checked_calls:
            found.setdefault((node.lineno, name), f"{name} used without a call: its arguments cannot be checked")
    return sorted((line, name, why) for (line, name), why in found.items())


def audit_listeners(source: str, module_name: str = "") -> list[tuple[int, str]]:
    """(line, what) for every place in `source` that may start a server: a server library, `ray.init`,
    an argv list running `mlflow ui`/`mlflow server`, or a host= argument naming every interface."""
    module = _parsed(source, module_name)
    found: set[tuple[int, str]] = set()
    for node, name in module.names_used():
        pattern = _covered(name, LISTENER_NAMES)
        if pattern:
            found.add((node.lineno, pattern))
    for node in ast.walk(module.tree):
        if isinstance(node, (ast.List, ast.Tuple)):
            words = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            for first, second in zip(words, words[1:]):
                if first == "mlflow" and second in ("ui", "server"):
                    found.add((node.lineno, f"mlflow {second}"))
        elif isinstance(node, ast.keyword) and node.arg in ("host", "dashboard_host"):
            if isinstance(node.value, ast.Constant) and node.value.value in ALL_INTERFACES:
                found.add((node.value.lineno, f"{node.arg}={node.value.value!r}"))
    return sorted(found)


def audited_files() -> list[Path]:
    files = [p for package in AUDITED_PACKAGES for p in sorted((REPO / package).rglob("*.py"))]
    assert len(files) > 50  # the audit really sees the code base
    return files


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def test_audit_flags_every_unpickling_pattern():
    must_flag = {
        "import pickle\npickle.load(f)": "pickle.load",
        "import pickle\nx = pickle.loads(b)": "pickle.loads",
        "from pickle import loads\nloads(b)": "pickle.loads",
        "import pickle as p\nclass U(p.Unpickler):\n    pass": "pickle.Unpickler",
        "import _pickle\n_pickle.loads(b)": "_pickle.loads",
        "import cloudpickle\ncloudpickle.loads(b)": "cloudpickle",
        "from dill import loads": "dill",
        "import joblib\njoblib.load('m.joblib')": "joblib.load",
        "import torch\ntorch.load(p)": "torch.load",
        "import torch\ntorch.load(p, weights_only=False)": "torch.load",
        "import torch\ntorch.load(p, weights_only=flag)": "torch.load",
        "from torch import load\nload(p, map_location='cpu')": "torch.load",
        "import torch\nreader = torch.load": "torch.load",
        "import numpy as np\nnp.load(p, allow_pickle=True)": "numpy.load",
        "import pandas as pd\npd.read_pickle(p)": "pandas.read_pickle",
        "import yaml\nyaml.load(s)": "yaml.load",
        "import yaml\nyaml.load(s, Loader=yaml.Loader)": "yaml.load",
        "import yaml\nyaml.load(s, yaml.FullLoader)": "yaml.load",
        "import yaml\nyaml.unsafe_load(s)": "yaml.unsafe_load",
        "import yaml\nclass L(yaml.FullLoader):\n    pass\nyaml.load(s, Loader=L)": "yaml.load",
        "eval('1 + 1')": "builtins.eval",
        "exec(code)": "builtins.exec",
        "import builtins\nbuiltins.exec(code)": "builtins.exec",
        "import shelve\nshelve.open(p)": "shelve",
        "import marshal\nmarshal.loads(b)": "marshal.loads",
        "from ray import tune\ntune.Tuner.restore(path, trainable)": "ray.tune.Tuner.restore",
        "import ray.cloudpickle as cp\ncp.loads(b)": "ray.cloudpickle",
        "def f():\n    import torch.jit\n    return torch.jit.load(p)": "torch.jit.load",
    }
    for source, name in must_flag.items():
        assert name in [n for _, n, _ in audit_unpickling(source)], f"not flagged: {source!r}"
    # A relative import resolves against the module's own package.
    assert [n for _, n, _ in audit_unpickling("from . import load\nload(p)", "torch.serialization")] == ["torch.load"]
    must_pass = [
        "import torch\ntorch.load(p, map_location='cpu', weights_only=True)",
        "import numpy as np\nnp.load(p)\nnp.load(p, allow_pickle=False)",
        "import yaml\nyaml.safe_load(s)\nyaml.load(s, Loader=yaml.SafeLoader)",
        "import yaml\nclass L(yaml.SafeLoader):\n    pass\nclass M(L):\n    pass\nyaml.load(s, Loader=M)",
        "model.eval()\nnet.eval().to('cpu')",
        "import json\njson.loads(s)",
        "import pickle\npickle.dumps(x)",  # writing is not reading
        "from safetensors.torch import load_file\nload_file(p)",
    ]
    for source in must_pass:
        assert audit_unpickling(source) == [], f"flagged: {source!r}"


def test_audit_flags_every_listener_pattern():
    must_flag = {
        "import socket\ns = socket.socket()\ns.bind(('', 0))": "socket.socket",
        "from http.server import HTTPServer": "http.server",
        "import uvicorn\nuvicorn.run(app)": "uvicorn",
        "import ray\nray.init(include_dashboard=True)": "ray.init",
        "import subprocess\nsubprocess.run(['python', '-m', 'mlflow', 'server'])": "mlflow server",
        "serve(app, host='0.0.0.0')": "host='0.0.0.0'",
    }
    for source, what in must_flag.items():
        assert what in [w for _, w in audit_listeners(source)], f"not flagged: {source!r}"
    assert audit_listeners("print('mlflow ui --host 0.0.0.0 exposes it')\nx = {'host': '127.0.0.1'}") == []


def test_no_code_path_unpickles_a_file():
    """Every use of an unpickling (or code-running) function in bdcore/ and sweep/ is listed in ALLOWED."""
    findings, used = [], set()
    for path in audited_files():
        rel = path.relative_to(REPO).as_posix()
        for line, name, why in audit_unpickling(path.read_text(), _module_name(path)):
            if (rel, name) in ALLOWED:
                used.add((rel, name))
            else:
                findings.append(f"{rel}:{line}: {name}: {why}")
    assert findings == [], "code that can unpickle a file (weights: safetensors; metadata: JSON):\n" + "\n".join(
        findings)
    assert used == set(ALLOWED), f"stale ALLOWED entries: {sorted(set(ALLOWED) - used)}"


def test_every_listener_is_reviewed():
    sites = {}
    for path in audited_files():
        rel = path.relative_to(REPO).as_posix()
        for line, what in audit_listeners(path.read_text(), _module_name(path)):
            sites.setdefault((rel, what), line)
    assert set(sites) == set(LISTENERS_REVIEWED), (
        f"unreviewed listeners: {sorted(set(sites) - set(LISTENERS_REVIEWED))}; "
        f"reviewed ones gone: {sorted(set(LISTENERS_REVIEWED) - set(sites))}")


# ------------------------------------------------------------------------------------ planted pickles

_EVENTS: list[tuple[str, tuple]] | None = None  # audit events recorded while `recorded_events` runs
_HOOKED = False


def _record(event: str, args: tuple) -> None:
    if _EVENTS is not None and event in ("pickle.find_class", "open", "os.listdir", "os.scandir", "glob.glob"):
        _EVENTS.append((event, args))


@contextlib.contextmanager
def recorded_events():
    """Record unpickling (`pickle.find_class`) and file/folder access events in the block. Audit hooks
    cannot be removed: the one installed here does nothing outside such a block."""
    global _EVENTS, _HOOKED
    if not _HOOKED:
        sys.addaudithook(_record)
        _HOOKED = True
    events: list[tuple[str, tuple]] = []
    _EVENTS = events
    try:
        yield events
    finally:
        _EVENTS = None


def _unpickled_globals(events) -> list[str]:
    return [".".join(map(str, args)) for event, args in events if event == "pickle.find_class"]


def _touched_paths(events) -> list[str]:
    paths = []
    for event, args in events:
        if event != "pickle.find_class" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            paths.append(os.path.abspath(os.fsdecode(args[0])))
    return paths


class _Booby:
    """Unpickling this object opens `marker` for writing, i.e. creates it: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@dataclass
class Trap:
    marker: Path

    def payload(self) -> bytes:
        return pickle.dumps({"weights": torch.zeros(2).numpy(), "trap": _Booby(self.marker)})

    def torch_payload(self, tensors: dict | None = None) -> bytes:
        """A torch.save'd state dict (what a .pt/.pth/.bin weights file is) that carries the trap."""
        import io

        buffer = io.BytesIO()
        torch.save({**(tensors or {"w": torch.zeros(2)}), "trap": _Booby(self.marker)}, buffer)
        return buffer.getvalue()

    def plant(self, path: Path, data: bytes | None = None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.payload() if data is None else data)
        return path

    @contextlib.contextmanager
    def armed(self):
        """The block must neither spring the trap nor resolve any global with a standard unpickler."""
        with recorded_events() as events:
            yield events
        assert not self.marker.exists(), "a planted pickle was unpickled: its code ran"
        assert _unpickled_globals(events) == []


@pytest.fixture
def trap(tmp_path):
    armed = Trap(tmp_path / "TRAP-SPRUNG")
    # The trap is real: plain pickle would run it, and the audit hook sees the global it resolves.
    with recorded_events() as events:
        pickle.loads(armed.payload())["trap"].close()
    assert armed.marker.exists() and "io.open" in _unpickled_globals(events)
    armed.marker.unlink()
    return armed


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _swap_file(folder: Path, name: str, data: bytes, field: str = "files") -> None:
    """Replace `folder/name` by `data` and record its new hash in metadata.json (under "files", or as
    `field`), as an attacker able to write the folder can: the hash check alone does not stop it."""
    (folder / name).write_bytes(data)
    meta = json.loads((folder / "metadata.json").read_text())
    if field == "files":
        meta["files"][name] = _sha256(folder / name)
    else:
        meta[field] = _sha256(folder / name)
    (folder / "metadata.json").write_text(json.dumps(meta))


# -- bdcore artifacts


def _artifact(folder: Path) -> Path:
    from bdcore.artifacts import save_artifact

    return save_artifact(folder, {"w": torch.ones(2, 3)}, {"kind": "attack"}, extra={"attack.mask": torch.ones(2)})


@pytest.mark.parametrize("swapped", ["model.safetensors", "extra.safetensors"])
def test_artifact_weights_replaced_by_a_pickle_are_refused(tmp_path, trap, swapped):
    from bdcore.artifacts import ArtifactError, load_artifact, verify_artifact

    folder = _artifact(tmp_path / "a")
    _swap_file(folder, swapped, trap.torch_payload())
    with trap.armed():
        verify_artifact(folder)  # hashes match: the file is what the metadata names, but ...
        with pytest.raises(ArtifactError, match=f"cannot read {swapped}"):
            load_artifact(folder)  # ... it is read as safetensors only


def test_artifact_metadata_replaced_by_a_pickle_is_refused(tmp_path, trap):
    from bdcore.artifacts import ArtifactError, load_artifact, read_metadata

    folder = _artifact(tmp_path / "a")
    trap.plant(folder / "metadata.json")
    with trap.armed():
        for read in (read_metadata, load_artifact):
            with pytest.raises(ArtifactError, match="metadata.json is not valid JSON"):
                read(folder)


def test_pickles_next_to_an_artifact_are_never_read(tmp_path, trap):
    from bdcore.artifacts import ArtifactError, load_artifact

    folder = _artifact(tmp_path / "a")
    planted = [trap.plant(folder / name, trap.torch_payload())
               for name in ("model.pt", "model.pth", "model.pkl", "pytorch_model.bin", "checkpoint.pt")]
    with trap.armed() as events:
        artifact = load_artifact(folder)
    assert set(artifact.model_state) == {"w"} and set(artifact.extra) == {"attack.mask"}
    assert not set(map(str, planted)) & set(_touched_paths(events))
    # Naming such a file in the metadata (hash and all) does not make it loadable.
    _swap_file(folder, "model.pkl", (folder / "model.pkl").read_bytes())
    with trap.armed(), pytest.raises(ArtifactError, match="unexpected file 'model.pkl'"):
        load_artifact(folder)


# -- cached attack resources (generated triggers, surrogates)


def _build_counter():
    calls = []

    def build():
        calls.append(1)
        return {"trigger": torch.full((3, 4, 4), 0.5)}, {"note": "built"}

    return calls, build


@pytest.mark.parametrize("planted", ["tensors.safetensors", "metadata.json"])
def test_resource_cache_replaced_by_a_pickle_is_rebuilt(tmp_path, trap, planted):
    """A damaged cached resource is rebuilt (the store's documented behaviour); a pickle is never read."""
    from bdcore.attacks.resources import ResourceStore

    calls, build = _build_counter()
    first = ResourceStore(tmp_path / "resources").get_or_build("trigger", {"size": 4}, build)
    if planted == "tensors.safetensors":
        _swap_file(first.path, planted, trap.payload(), field="sha256")
    else:
        trap.plant(first.path / planted)
    with trap.armed():
        again = ResourceStore(tmp_path / "resources").get_or_build("trigger", {"size": 4}, build)
    assert len(calls) == 2 and not again.reused
    assert torch.equal(again.tensors["trigger"], torch.full((3, 4, 4), 0.5))
    reread = ResourceStore(tmp_path / "resources").get_or_build("trigger", {"size": 4}, build)
    assert reread.reused and len(calls) == 2  # the rebuilt copy replaced the pickle


def test_pickles_next_to_a_cached_resource_are_never_read(tmp_path, trap):
    from bdcore.attacks.resources import ResourceStore

    calls, build = _build_counter()
    first = ResourceStore(tmp_path / "resources").get_or_build("trigger", {"size": 4}, build)
    planted = [trap.plant(first.path / name) for name in ("tensors.pt", "trigger.pkl", "cache.bin")]
    planted.append(trap.plant(tmp_path / "resources" / "trigger-0123456789abcdef.pkl"))
    with trap.armed() as events:
        again = ResourceStore(tmp_path / "resources").get_or_build("trigger", {"size": 4}, build)
    assert again.reused and len(calls) == 1
    assert not set(map(str, planted)) & set(_touched_paths(events))


# -- pretrained weights (classifiers and CLIP), checkpoints, other caches


def _info():
    from bdcore.data import DatasetInfo

    return DatasetInfo(name="synthetic", num_classes=10, channels=3, height=32, width=32, mean=(0.5,) * 3,
                       std=(0.25,) * 3)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".pkl", ".bin", ".ckpt", ".safetensors"])
def test_pretrained_weights_that_are_pickles_are_refused(tmp_path, trap, suffix):
    from bdcore.models import WeightsError, build_model, check_weights_file, read_weight_shapes

    state = build_model("smallcnn", _info()).state_dict()
    path = trap.plant(tmp_path / f"weights{suffix}", trap.torch_payload(dict(state)))
    with trap.armed():
        for load in (lambda: build_model("smallcnn", _info(), pretrained=path),
                     lambda: check_weights_file(path, "smallcnn"), lambda: read_weight_shapes(path)):
            with pytest.raises(WeightsError, match="cannot read weights file"):
                load()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the planted .pkl
def test_clip_weights_that_are_pickles_are_refused(tmp_path, trap, monkeypatch):
    """`clip:<arch>` reads weights from $BDCORE_WEIGHTS_ROOT/clip/<arch>/ (or a given path): a pickle
    there is refused, and a *.pkl is not even looked at."""
    from bdcore.clip.models import build_clip, find_weights
    from bdcore.models import WeightsError

    monkeypatch.setenv("BDCORE_WEIGHTS_ROOT", str(tmp_path / "weights"))
    folder = tmp_path / "weights" / "clip" / "RN50"
    trap.plant(folder / "a_model.pkl")
    assert "no weights for clip:RN50" in _error_of(lambda: find_weights("RN50"), WeightsError)
    bundled = trap.plant(folder / "open_clip_pytorch_model.bin", trap.torch_payload())
    with trap.armed():
        assert find_weights("RN50") == bundled
        for path in (bundled, folder / "a_model.pkl"):
            with pytest.raises(WeightsError, match="cannot read weights file"):
                build_clip("clip:tiny", weights=path)


def _error_of(call, kind) -> str:
    with pytest.raises(kind) as excinfo:
        call()
    return str(excinfo.value)


def test_training_checkpoint_replaced_by_a_pickle_restarts_training(tmp_path, trap):
    from bdcore.train.loop import Checkpointer

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpointer = Checkpointer(tmp_path / "work", "run-fingerprint")
    trap.plant(checkpointer.path, trap.torch_payload())
    trap.plant(checkpointer.folder / "checkpoint.pt", trap.torch_payload())
    with trap.armed():
        assert checkpointer.load(model, [optimizer], [], torch.Generator()) == (0, [])  # documented: restart


def test_clip_trigger_state_replaced_by_a_pickle_is_prepared_again(tmp_path, trap):
    from bdcore.clip.cells import _prepared_attack

    class Attack:
        prepared = False

        def load_state_tensors(self, tensors):
            raise AssertionError("a planted file was loaded as the trigger")

        def prepare(self, bundle, pairs, device):
            self.prepared = True

        def state_tensors(self):
            return {"trigger": torch.ones(3)}

    trap.plant(tmp_path / "attack_state.safetensors")
    attack = Attack()
    with trap.armed():
        _prepared_attack(attack, None, None, tmp_path, "cpu")
    assert attack.prepared
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "attack_state.safetensors"))["trigger"], torch.ones(3))


def test_analysis_caches_replaced_by_pickles_are_recomputed(tmp_path, trap):
    from bdcore.reactivation.cells import _shared_cache

    trap.plant(tmp_path / "bec-clean.json")
    with trap.armed():
        assert _shared_cache(tmp_path, "bec")("clean", lambda: {"fresh": 1}) == {"fresh": 1}
    assert json.loads((tmp_path / "bec-clean.json").read_text()) == {"fresh": 1}


# -- datasets


def _py2_pickle(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _cifar10(folder: Path, trap: Trap | None = None, trapped: str = "") -> None:
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [1, 2]}
        if name == trapped:
            batch[b"filenames"] = _Booby(trap.marker)
        _py2_pickle(batch, folder / name)
    meta = {b"label_names": [f"c{i}".encode() for i in range(10)]}
    if trapped == "batches.meta":
        meta[b"num_vis"] = _Booby(trap.marker)
    _py2_pickle(meta, folder / "batches.meta")


@pytest.mark.parametrize("trapped", ["data_batch_3", "test_batch", "batches.meta"])
def test_cifar_batches_with_code_are_refused_and_plain_ones_load(tmp_path, trap, trapped):
    """CIFAR's python-version files are pickles: a restricted unpickler takes numpy arrays and plain data
    only, so a tampered batch is refused by the loader and by the pre-sweep folder check alike."""
    from bdcore.data import DatasetError, check_dataset_folder, load_dataset

    folder = tmp_path / "cifar-10-batches-py"
    _cifar10(folder)
    assert len(load_dataset("cifar10", root=folder).train) == 10  # the legitimate files load
    _cifar10(folder, trap, trapped)
    with trap.armed():
        message = _error_of(lambda: load_dataset("cifar10", root=folder), DatasetError)
        assert "refusing to unpickle global io.open" in message and trapped in message
        if trapped != "data_batch_3":  # the folder check reads the meta file and the test batch only
            assert "refusing to unpickle" in _error_of(lambda: check_dataset_folder("cifar10", folder), DatasetError)


def test_image_datasets_never_unpickle(tmp_path, trap):
    """Image loaders decode image files with PIL: a pickle named .png is a bad image, a .pkl is skipped."""
    from PIL import Image

    from bdcore.data import DatasetError, load_dataset

    for split in ("train", "test"):
        for label in ("cat", "dog"):
            (tmp_path / split / label).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / split / label / "0.png")
            trap.plant(tmp_path / split / label / "features.pkl")
    with trap.armed():
        assert len(load_dataset("imagefolder", root=tmp_path, size=8).train) == 2
    trap.plant(tmp_path / "train" / "cat" / "1.png")
    with trap.armed():
        assert "cannot read image" in _error_of(lambda: load_dataset("imagefolder", root=tmp_path, size=8),
                                                DatasetError)


def test_clip_caption_table_that_is_a_pickle_is_refused(tmp_path, trap):
    from bdcore.clip.data import load_caption_table

    path = trap.plant(tmp_path / "captions.parquet")
    # pyarrow's ArrowInvalid (a ValueError), reworded by check_caption_table to name the file.
    with trap.armed(), pytest.raises(ValueError, match="cannot read caption table .* as PARQUET: Parquet magic"):
        load_caption_table(path)


# -- sweep folders: markers, results, Tune's state


def _row(cell_id: str) -> dict:
    return {
        "cell_id": cell_id, "attack_cell_id": cell_id, "sweep": "sec", "stage": "attack", "dataset": "digits",
        "model": "smallcnn", "attack": "badnet", "ratio": 0.1, "label_mode": "all2one", "target": 0, "seed": 0,
        "defense": "none", "acc": 0.9, "asr": 0.9, "ra": 0.1, "der": None, "rir": None, "status": "done",
        "error": None, "wall_s": 1.0, "started_at": "2024-05-01T12:00:00+00:00",
        "finished_at": "2024-05-01T12:01:00+00:00", "artifact": None, "attack_params": "{}",
        "defense_params": "{}", "diagnostics": "{}", "attempts": 1,
    }


def test_cell_marker_that_is_a_pickle_is_unreadable_so_the_cell_reruns(tmp_path, trap):
    from sweep.layout import SweepLayout

    layout = SweepLayout(tmp_path)
    layout.write_marker("good", {"row": _row("good")})
    trap.plant(layout.marker("evil"))
    trap.plant(layout.marker("evil-proto0"), pickle.dumps(_Booby(trap.marker), protocol=0))  # ASCII pickle
    trap.plant(layout.cells / "evil.pkl")
    with trap.armed():
        assert layout.read_marker("evil") is None and layout.read_marker("evil-proto0") is None
        assert layout.finished_ids() == {"good": "done"}


def _plant_result_pickles(root: Path, trap: Trap) -> list[Path]:
    from sweep.layout import SweepLayout

    layout = SweepLayout(root)
    return [trap.plant(layout.rows / "evil-20240501T120000Z-0000.parquet"),
            trap.plant(layout.data / "part-20240501T120000Z-0000.parquet")]


def test_results_files_that_are_pickles_are_quarantined_with_a_warning(tmp_path, trap):
    from sweep.results import ResultsFileWarning, compact, load_results, write_row

    write_row(tmp_path, _row("good"))
    planted = _plant_result_pickles(tmp_path, trap)
    with trap.armed():
        with pytest.warns(ResultsFileWarning, match="unreadable results file") as caught:
            assert load_results(tmp_path)["cell_id"].tolist() == ["good"]
        messages = " ".join(str(w.message) for w in caught)
        assert all(str(p) in messages for p in planted)
        with pytest.warns(ResultsFileWarning, match="moved to"):
            assert compact(tmp_path) == 1
    assert not any(p.exists() for p in planted)
    assert len(list((tmp_path / "results" / "corrupt").iterdir())) == 2


def test_parquet_extension_type_metadata_is_never_unpickled(tmp_path, trap):
    """Old pyarrow unpickled the metadata of an `arrow.py_extension_type` column (CVE-2023-47248)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sweep.layout import SweepLayout
    from sweep.results import load_results, write_row

    table = pq.read_table(write_row(tmp_path, _row("good")))
    evil = {b"ARROW:extension:name": b"arrow.py_extension_type", b"ARROW:extension:metadata": trap.payload()}
    schema = pa.schema([f.with_metadata(evil) if f.name == "diagnostics" else f for f in table.schema])
    pq.write_table(pa.Table.from_arrays(table.columns, schema=schema),
                   SweepLayout(tmp_path).rows / "ext-20240501T120100Z-0000.parquet")
    with trap.armed(), warnings.catch_warnings():
        warnings.simplefilter("error")
        # Read as the plain string column it is stored as; its extension metadata is ignored.
        assert load_results(tmp_path, latest_only=False)["cell_id"].tolist() == ["good", "good"]


TUNE_STATE_FILES = [
    "experiment_state-2024-05-01_12-00-00.json", "searcher-state-2024-05-01_12-00-00.pkl",
    "search_gen_state-2024-05-01_12-00-00.json", "basic-variant-state-2024-05-01_12-00-00.json",
    "callback-states-2024-05-01_12-00-00.pkl", "tuner.pkl", "trainable.pkl",
    "attack-c0-00000/params.pkl", "attack-c0-00000/error.pkl", "attack-c0-00000/result.json",
    "attack-c0-00000/checkpoint_000000/_dict_checkpoint.pkl", "cells/c0.json", "results/rows/x.parquet",
]


def test_resume_never_reads_tunes_own_state(tmp_path, trap):
    """Finished cells come from the engine's markers, never from Tune's pickled experiment state: plan,
    reconcile (the start of a resumed `bdsweep run`), results, status, compaction and SQL queries
    neither unpickle nor even open a file under DIR/tune/. Ray itself is not started."""
    import yaml

    from sweep.execute import base_row, now_iso
    from sweep.grid import expand, parse_grid, plan_summary
    from sweep.layout import SweepLayout
    from sweep.query import query_results
    from sweep.results import compact, load_results, status_summary
    from sweep.runner import cell_payload, reconcile
    from sweep.tracking import NullTracker

    grid = {"name": "sec", "datasets": ["digits"], "models": ["smallcnn"], "attacks": ["badnet"], "ratios": [0.1],
            "defenses": ["ft"]}
    plan = expand(parse_grid(yaml.safe_dump(grid), "sec.yaml"))
    layout = SweepLayout(tmp_path)
    attack = plan.attacks[0]
    row = base_row(cell_payload(attack, "attack"), plan.name)
    row.update(status="done", finished_at=now_iso())
    layout.write_marker(attack.cell_id, {"row": row, "history": [], "traceback": None})
    tune_dir = tmp_path / "tune" / "sec-20240501-120000-1"
    for name in TUNE_STATE_FILES:
        trap.plant(tune_dir / name)

    with trap.armed() as events:
        markers = {m["row"]["cell_id"]: m for m in layout.markers()}
        assert reconcile(layout, NullTracker(), markers) == 1  # the marker's row is written
        summary = plan_summary(plan, tmp_path)
        assert (summary["done"], summary["pending"]) == (1, plan.total_cells - 1)
        assert load_results(tmp_path)["cell_id"].tolist() == [attack.cell_id]
        assert status_summary(tmp_path)["by_status"]["done"] == 1
        assert compact(tmp_path) == 1
        assert query_results(tmp_path, "SELECT count(*) AS n FROM results")["n"].tolist() == [1]
    touched = _touched_paths(events)
    assert any(p.startswith(str(layout.cells)) for p in touched)  # the recording sees file access ...
    assert [p for p in touched if p.startswith(str(tmp_path / "tune"))] == []  # ... and none under tune/


# ------------------------------------------------------------------------------------ listeners


def test_bdsweep_ui_binds_to_loopback_unless_told_otherwise(tmp_path):
    from sweep.cli import build_parser, mlflow_ui_argv

    argv = mlflow_ui_argv(tmp_path)
    assert argv[:4] == [sys.executable, "-m", "mlflow", "ui"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "5000"
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    chosen = mlflow_ui_argv(tmp_path, host="0.0.0.0", port=8123)
    assert chosen[chosen.index("--host") + 1] == "0.0.0.0" and chosen[chosen.index("--port") + 1] == "8123"
    defaults = build_parser().parse_args(["ui", str(tmp_path)])
    assert (defaults.host, defaults.port) == ("127.0.0.1", 5000)


@pytest.mark.parametrize("host,warned", [("127.0.0.1", False), ("localhost", False), ("::1", False),
                                         ("0.0.0.0", True), ("192.0.2.7", True), ("example.org", True)])
def test_bdsweep_ui_runs_mlflow_and_warns_off_loopback(tmp_path, monkeypatch, capsys, host, warned):
    import subprocess

    from sweep.cli import main

    (tmp_path / "mlflow.db").write_bytes(b"")
    started = []
    monkeypatch.setattr(subprocess, "run", lambda argv, **kw: started.append(argv) or
                        subprocess.CompletedProcess(argv, 0))
    assert main(["ui", str(tmp_path), "--host", host, "--port", "5123"]) == 0
    err = capsys.readouterr().err
    assert len(started) == 1 and started[0][started[0].index("--host") + 1] == host
    assert ("warning: the MLflow UI listens on" in err) is warned


def test_bdsweep_ui_refuses_a_folder_without_a_store(tmp_path, capsys):
    from sweep.cli import main

    assert main(["ui", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bdsweep: error: ") and "mlflow.db" in err and "\n" not in err
    assert main(["ui", str(tmp_path / "nowhere")]) == 2
    capsys.readouterr()
    (tmp_path / "mlflow.db").write_bytes(b"")
    assert main(["ui", str(tmp_path), "--port", "0"]) == 2
    assert "--port" in capsys.readouterr().err


def test_ray_starts_without_its_dashboard(monkeypatch):
    """The driver's local Ray starts with no dashboard (the only HTTP server Ray would add)."""
    import ray

    from sweep.runner import _init_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: calls.append(kwargs))
    assert _init_ray(None) is True and _init_ray("ray://head:10001") is True
    for kwargs in calls:
        assert kwargs.get("include_dashboard") is False and "dashboard_host" not in kwargs
