"""Renders helm/ with the real helm binary (installed by `make test`) for the chart tests.

Kept apart from the tests so they read as checks: here is how to find helm, render a set of
values, and look things up in the rendered manifests.
"""

from __future__ import annotations

import copy
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm"
RELEASE = "emb"
NAMESPACE = "search"

MISSING_HELM = (
    "helm binary not found at {path}. The chart tests need it: run `make test` (it installs "
    "helm), or `bash helm/install-helm.sh .tools`, or point HELM_BIN at a helm binary."
)


def helm_path() -> Path:
    """$HELM_BIN, else .tools/bin/helm in the repository (where install-helm.sh puts it)."""
    return Path(os.environ.get("HELM_BIN") or REPO / ".tools" / "bin" / "helm")


def run_helm(helm: Path, *args: str, values: dict | None = None) -> subprocess.CompletedProcess:
    """Runs helm with `values` passed as a values file; never raises on a non-zero exit."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as fh:
        yaml.safe_dump(values or {}, fh)
        fh.flush()
        return subprocess.run(
            [str(helm), *args, "-f", fh.name],
            capture_output=True, text=True, timeout=60, check=False,
        )


def default_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def merge_values(base: dict, overrides: dict) -> dict:
    """Helm's merge of a values file over the defaults: maps merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_values(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass
class Rendered:
    """The manifests of one `helm template` and the effective values that produced them."""

    values: dict
    manifests: list[dict]

    def of_kind(self, kind: str) -> list[dict]:
        return [m for m in self.manifests if m["kind"] == kind]

    def one(self, kind: str) -> dict:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
        return found[0]

    @property
    def pod(self) -> dict:
        return self.one("Deployment")["spec"]["template"]

    @property
    def pod_spec(self) -> dict:
        return self.pod["spec"]

    @property
    def server(self) -> dict:
        (container,) = [c for c in self.pod_spec["containers"] if c["name"] == "server"]
        return container

    @property
    def init_containers(self) -> list[dict]:
        return self.pod_spec.get("initContainers", [])

    def volume(self, name: str) -> dict:
        (volume,) = [v for v in self.pod_spec["volumes"] if v["name"] == name]
        return volume


def render(helm: Path, overrides: dict) -> Rendered:
    """`helm template` with `overrides`; fails the test with helm's message if it errors."""
    proc = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                    values=overrides)
    assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
    manifests = [m for m in yaml.safe_load_all(proc.stdout) if m]
    return Rendered(merge_values(default_values(), overrides), manifests)


def env_of(container: dict) -> dict[str, Any]:
    """name -> value (a plain string) or the valueFrom mapping."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def mount_at(pod_spec: dict, container: dict, path: str) -> tuple[dict, dict]:
    """The volumeMount covering `path` in `container` (longest prefix) and its volume."""
    mounts = [
        m for m in container.get("volumeMounts", [])
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts, f"container {container['name']}: nothing mounted at {path}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    (volume,) = [v for v in pod_spec["volumes"] if v["name"] == mount["name"]]
    return mount, volume


def leaf_keys(values: dict, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf of a values mapping (an empty mapping is a leaf)."""
    keys = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            keys.extend(leaf_keys(value, path + "."))
        else:
            keys.append(path)
    return keys
