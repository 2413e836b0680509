"""Where models come from: local model directories, an optional pinned download from a Hugging Face
model repo, and one shared, lock-protected cache of loaded Predictors (used by the app).

Download settings (all optional, off by default):
  DEFECTCLS_HUB_MODEL_REPO       model repo id, e.g. "acme/defectcls-models"
  DEFECTCLS_HUB_MODEL_REVISION   the full 40-digit commit sha to pin (required with the repo)
  DEFECTCLS_HUB_MODEL_SUBFOLDER  folder inside the repo holding card.json + model.safetensors (default: root)
  DEFECTCLS_HUB_MODEL_NAME       local directory name under models/ (default: subfolder or repo name)
HF_HUB_OFFLINE=1 keeps working: files come from the local Hugging Face cache, or a clear error says they are not there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from .config import models_dir
from .errors import DefectclsError, ModelLoadError

ENV_REPO = "DEFECTCLS_HUB_MODEL_REPO"
ENV_REVISION = "DEFECTCLS_HUB_MODEL_REVISION"
ENV_SUBFOLDER = "DEFECTCLS_HUB_MODEL_SUBFOLDER"
ENV_NAME = "DEFECTCLS_HUB_MODEL_NAME"
CARD_FILE = "card.json"
WEIGHTS_FILE = "model.safetensors"
MARKER_FILE = "hub.json"
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_model(repo_id: str, revision: str, name: str | None = None, subfolder: str | None = None,
                   models_root: str | os.PathLike | None = None) -> Path:
    """Fetch card.json + model.safetensors at a pinned commit into MODELS_ROOT/NAME; returns that directory.

    Only safetensors weights are fetched (no pickles). A directory already fetched from the
    same repo, revision and subfolder is reused without touching the network.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if not _REPO_RE.match(repo_id or ""):
        raise DefectclsError(f"model repo must look like 'owner/name'; got {repo_id!r}")
    if not _SHA_RE.match(revision or ""):
        raise DefectclsError(f"{ENV_REVISION} must be a full 40-digit commit sha (pinned download); got {revision!r}")
    subfolder = (subfolder or "").strip("/") or None
    if subfolder and (".." in subfolder.split("/") or subfolder.startswith("/")):
        raise DefectclsError(f"model subfolder must stay inside the repo; got {subfolder!r}")
    name = name or (subfolder.split("/")[-1] if subfolder else repo_id.split("/")[-1])
    if not _NAME_RE.match(name):
        raise DefectclsError(f"model name must be letters, digits, '.', '_' or '-'; got {name!r}")
    root = Path(models_root if models_root is not None else models_dir())
    dest = root / name
    want = {"repo_id": repo_id, "revision": revision, "subfolder": subfolder}
    marker = dest / MARKER_FILE
    if marker.is_file() and (dest / CARD_FILE).is_file() and (dest / WEIGHTS_FILE).is_file():
        try:
            have = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            have = {}
        if all(have.get(k) == v for k, v in want.items()):
            return dest

    where = f"{repo_id}@{revision[:12]}" + (f"/{subfolder}" if subfolder else "")
    fetched: dict[str, Path] = {}
    for fname in (CARD_FILE, WEIGHTS_FILE):
        try:
            fetched[fname] = Path(hf_hub_download(repo_id, fname, subfolder=subfolder, revision=revision,
                                                  repo_type="model"))
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
            raise ModelLoadError(f"cannot fetch {fname} from {where}: not in the local Hugging Face cache and the Hub "
                                 "cannot be reached (HF_HUB_OFFLINE set or no network)") from exc
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
            raise ModelLoadError(f"cannot fetch {fname} from {where}: {type(exc).__name__} "
                                 "(check the repo id, revision and access token)") from exc
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot fetch {fname} from {where}: {str(exc).splitlines()[0][:200]}") from exc

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        for fname, src in fetched.items():
            shutil.copyfile(src, tmp / fname)
        from .models import load_model_dir

        load_model_dir(tmp)  # refuses a card or weights that do not fit before anything replaces DEST
        (tmp / MARKER_FILE).write_text(json.dumps({**want, "sha256": {f: _sha256(tmp / f) for f in fetched}},
                                                  indent=2) + "\n", encoding="utf-8")
        dest.mkdir(parents=True, exist_ok=True)
        for fname in (CARD_FILE, WEIGHTS_FILE, MARKER_FILE):
            os.replace(tmp / fname, dest / fname)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def model_from_env(models_root: str | os.PathLike | None = None) -> Path | None:
    """Download the model named by DEFECTCLS_HUB_MODEL_REPO (+ _REVISION, _SUBFOLDER, _NAME); None when unset."""
    repo = os.environ.get(ENV_REPO, "").strip()
    if not repo:
        return None
    revision = os.environ.get(ENV_REVISION, "").strip()
    if not revision:
        raise DefectclsError(f"{ENV_REPO} is set but {ENV_REVISION} is not: pin a full commit sha of {repo}")
    return download_model(repo, revision, name=os.environ.get(ENV_NAME) or None,
                          subfolder=os.environ.get(ENV_SUBFOLDER) or None, models_root=models_root)


def find_model_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """Model directories (with card.json and model.safetensors) directly under ROOT, sorted by name."""
    root = Path(root if root is not None else models_dir())
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / CARD_FILE).is_file()
                  and (p / WEIGHTS_FILE).is_file())


class ModelRegistry:
    """The app's models by directory name; each Predictor is loaded once (under a lock) and shared by
    every session. Predictors and ``explain`` are safe to call from many threads at once."""

    def __init__(self, model_dirs: Sequence[str | os.PathLike] | None = None, device: str = "auto",
                 default: str | None = None):
        dirs = [Path(d) for d in model_dirs] if model_dirs is not None else find_model_dirs()
        self.paths: dict[str, Path] = {}
        for d in dirs:
            self.paths.setdefault(d.name, d)
        self.device = device
        self._lock = threading.Lock()
        self._predictors: dict = {}
        self._ids: dict[str, str] = {}
        from .cli import DEFAULT_MODEL_NAME

        pick = default or DEFAULT_MODEL_NAME
        self.default = pick if pick in self.paths else (next(iter(self.paths)) if self.paths else None)

    def names(self) -> list[str]:
        return list(self.paths)

    def bench_models(self, archs: Sequence[str] = ("mobilenet_v3_large", "resnet50")) -> dict[str, str | None]:
        """For bench.benchmark: every registered model of each ARCH (name -> dir), or the bare ARCH -> None
        (timed on untrained weights) where none is registered."""
        out: dict[str, str | None] = {}
        for arch in archs:
            mine = {}
            for name, path in self.paths.items():
                try:
                    if self.card(name).arch == arch:
                        mine[name] = str(path)
                except DefectclsError:
                    continue
            out.update(mine or {arch: None})
        return out

    def _check(self, name: str | None) -> str:
        name = name or self.default
        if not self.paths:
            raise ModelLoadError(f"no trained model available: train one into {models_dir()}/ with `defectcls train`, "
                                 f"or set {ENV_REPO} and {ENV_REVISION} to download one")
        if not name or name not in self.paths:
            known = ", ".join(self.paths) or "none"
            raise ModelLoadError(f"unknown model {name!r}; available: {known} (train one with `defectcls train`)")
        return name

    def predictor(self, name: str | None = None):
        """The shared Predictor for NAME (default model when None), loaded on first use."""
        from .inference import Predictor

        name = self._check(name)
        with self._lock:
            if name not in self._predictors:
                self._predictors[name] = Predictor(self.paths[name], device=self.device)
            return self._predictors[name]

    def model_id(self, name: str | None = None) -> str:
        """name@<12 hex of the weights' sha256>, computed once per model."""
        from .models import model_id

        name = self._check(name)
        with self._lock:
            if name not in self._ids:
                self._ids[name] = model_id(self.paths[name])
            return self._ids[name]

    def name_for_id(self, mid: str | None) -> str | None:
        """The registered model with this exact id (same weights), or None."""
        for name in self.paths:
            try:
                if self.model_id(name) == mid:
                    return name
            except (DefectclsError, OSError):
                continue
        return None

    def card(self, name: str | None = None):
        """The model card, without loading weights."""
        from .models import read_card

        return read_card(self.paths[self._check(name)])

    def explain(self, name: str | None, src, method: str = "gradcam"):
        """Verdict + heat-map for one image with model NAME (the default model when None)."""
        from .explain import explain

        return explain(self.predictor(name), src, method)
